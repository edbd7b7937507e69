//! Small shared helpers.
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Tensors with string metadata as the bytes of a safetensors file (f32/f16/bf16/f64/i64/u32/u8
/// kept as they are, other dtypes as f32): files, and the stage RPC's request and reply bodies.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    struct View {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    }
    impl safetensors::View for &View {
        fn dtype(&self) -> safetensors::Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.bytes)
        }
        fn data_len(&self) -> usize {
            self.bytes.len()
        }
    }
    let mut views: Vec<(String, View)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (t, dtype) = match t.dtype() {
            DType::F32 => (t.clone(), safetensors::Dtype::F32),
            DType::F16 => (t.clone(), safetensors::Dtype::F16),
            DType::BF16 => (t.clone(), safetensors::Dtype::BF16),
            DType::F64 => (t.clone(), safetensors::Dtype::F64),
            DType::I64 => (t.clone(), safetensors::Dtype::I64),
            DType::U32 => (t.clone(), safetensors::Dtype::U32),
            DType::U8 => (t.clone(), safetensors::Dtype::U8),
            _ => (t.to_dtype(DType::F32)?, safetensors::Dtype::F32),
        };
        let t = t.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        let mut bytes = Vec::new();
        t.write_bytes(&mut bytes)?;
        views.push((name.clone(), View { dtype, shape: t.dims().to_vec(), bytes }));
    }
    let refs: Vec<(&str, &View)> = views.iter().map(|(n, v)| (n.as_str(), v)).collect();
    Ok(safetensors::serialize(refs, Some(metadata.clone()))?)
}

/// Writes tensors with string metadata to a safetensors file atomically (temp file, then
/// rename), so an interrupted write never leaves a truncated file under the final name.
pub fn save_safetensors(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let list: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    let bytes = safetensors_bytes(&list, metadata).with_context(|| format!("writing {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temp file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a temp file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// sha256 of a whole file, hex (64 digits).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Reads the string metadata of a safetensors file.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Held while a results line is written (and by a signal handler before it exits), so that an
/// exit on SIGINT/SIGTERM/SIGHUP never cuts a line in half.
static WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` (one whole write) so that a signal-triggered exit waits for it to finish.
pub fn uninterrupted<R>(f: impl FnOnce() -> R) -> R {
    let _g = WRITES.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

/// Waits for the write in progress, if any, and keeps new ones from starting while held.
pub fn hold_writes() -> std::sync::MutexGuard<'static, ()> {
    WRITES.lock().unwrap_or_else(|p| p.into_inner())
}
