//! Device and dtype resolution shared by every command that runs a model:
//! `--device auto|cpu|cuda[:N]` and `--dtype auto|f32|f16|bf16|gguf`, where `auto` is bf16 on a
//! GPU; on the CPU it is `gguf` for a GGUF checkpoint and f32 otherwise (f32 is the reference
//! path and stays available everywhere for golden checks).
use crate::models::weights::WeightDType;
use anyhow::Result;
use candle_core::{Device, DeviceLocation};

/// `--dtype`: a fixed weight dtype, or `auto` (resolved once the device is known).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    #[default]
    Auto,
    Fixed(WeightDType),
}

impl std::str::FromStr for DTypeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(DTypeChoice::Auto),
            other => other.parse::<WeightDType>().map(DTypeChoice::Fixed).map_err(|e| {
                anyhow::anyhow!("{e} (or auto: bf16 on a GPU; on the CPU gguf for a GGUF checkpoint, else f32)")
            }),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DTypeChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("dtype {s:?}: {e}")))
    }
}

impl std::fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DTypeChoice::Auto => f.write_str("auto"),
            DTypeChoice::Fixed(d) => f.write_str(d.name()),
        }
    }
}

impl From<WeightDType> for DTypeChoice {
    fn from(d: WeightDType) -> Self {
        DTypeChoice::Fixed(d)
    }
}

impl DTypeChoice {
    /// The dtype to load with on `device`.
    pub fn resolve(self, device: &Device) -> WeightDType {
        match self {
            DTypeChoice::Fixed(d) => d,
            DTypeChoice::Auto => default_dtype(device),
        }
    }

    /// The dtype to load `model` (alias, directory or .gguf) with on `device`. `auto` on the CPU
    /// keeps a GGUF checkpoint quantized: `gguf` decodes about 3–5× (batch 1) and 3× (batch 2)
    /// faster there than dequantized f32 (our 8-bit kernel, `models/q8.rs`) and prefills at about
    /// 0.7× its speed (see docs/exp12.md); other checkpoints load in f32.
    pub fn resolve_for(self, device: &Device, model: &str) -> WeightDType {
        let gguf = || {
            crate::models::registry::resolve(model)
                .is_ok_and(|r| matches!(r.location, crate::models::registry::Location::Gguf(_)))
        };
        match self {
            DTypeChoice::Auto if device.is_cpu() && gguf() => WeightDType::Gguf,
            other => other.resolve(device),
        }
    }
}

/// bf16 on a GPU (half the bytes per decode step, tensor cores), f32 on the CPU (the reference
/// path). GGUF checkpoints on the CPU get `gguf` instead: see [`DTypeChoice::resolve_for`].
pub fn default_dtype(device: &Device) -> WeightDType {
    if device.is_cuda() {
        WeightDType::BF16
    } else {
        WeightDType::F32
    }
}

/// `cpu` or `cuda:N`, as result lines and reports name the device.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Whether this binary was built with `--features cuda`.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// `(free, total)` bytes of device memory; `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn mem_info(device: &Device) -> Result<Option<(usize, usize)>> {
    match device {
        Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| anyhow::anyhow!("cuMemGetInfo on {}: {e:?}", device_name(device)))?;
            Ok(Some((free, total)))
        }
        _ => Ok(None),
    }
}

/// `(free, total)` bytes of device memory; `None` on the CPU.
#[cfg(not(feature = "cuda"))]
pub fn mem_info(_device: &Device) -> Result<Option<(usize, usize)>> {
    Ok(None)
}

/// Bytes held by the device's default stream-ordered memory pool: `(current, high-water mark)`.
/// candle allocates every tensor (weights included) from it when the GPU supports
/// `cuMemAllocAsync`, so the high-water mark is the peak of weights + activations + KV cache, as
/// `torch.cuda.max_memory_allocated` is for torch. `None` on the CPU or without async allocation.
#[cfg(feature = "cuda")]
pub fn pool_usage(device: &Device) -> Result<Option<(u64, u64)>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else { return Ok(None) };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
    let check = |r: sys::CUresult, what: &str| -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            anyhow::bail!("{what} on {}: {r:?}", device_name(device))
        }
    };
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: plain driver queries on this context's device; the outputs are written by the driver.
    unsafe {
        check(sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()), "cuDeviceGetDefaultMemPool")?;
        let pool = pool.assume_init();
        let (mut cur, mut high) = (0u64, 0u64);
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
        check(sys::cuMemPoolGetAttribute(pool, attr, &mut cur as *mut u64 as *mut _), "cuMemPoolGetAttribute")?;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        check(sys::cuMemPoolGetAttribute(pool, attr, &mut high as *mut u64 as *mut _), "cuMemPoolGetAttribute")?;
        Ok(Some((cur, high)))
    }
}

/// Resets the pool's high-water mark to the current use (before a measured workload).
#[cfg(feature = "cuda")]
pub fn reset_peak(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else { return Ok(()) };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    device.synchronize()?;
    ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: as in pool_usage; resetting USED_MEM_HIGH takes a zero u64.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("cuDeviceGetDefaultMemPool failed on {}", device_name(device));
        }
        let mut zero = 0u64;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let r = sys::cuMemPoolSetAttribute(pool.assume_init(), attr, &mut zero as *mut u64 as *mut _);
        if r != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("resetting the memory pool's high-water mark on {}: {r:?}", device_name(device));
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn pool_usage(_device: &Device) -> Result<Option<(u64, u64)>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
pub fn reset_peak(_device: &Device) -> Result<()> {
    Ok(())
}

/// Waits for queued GPU work (timings); a no-op on the CPU.
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_auto_keeps_gguf_checkpoints_quantized_on_cpu() {
        let dir = std::env::temp_dir().join(format!("mws-dtype-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gguf = dir.join("m.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let cpu = Device::Cpu;
        assert_eq!(DTypeChoice::Auto.resolve_for(&cpu, gguf.to_str().unwrap()), WeightDType::Gguf);
        // A transformers directory (or anything unresolvable) stays on the f32 reference path.
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        assert_eq!(DTypeChoice::Auto.resolve_for(&cpu, dir.to_str().unwrap()), WeightDType::F32);
        assert_eq!(DTypeChoice::Auto.resolve_for(&cpu, "/no/such/model"), WeightDType::F32);
        // An explicit choice always wins.
        let f32 = DTypeChoice::Fixed(WeightDType::F32);
        assert_eq!(f32.resolve_for(&cpu, gguf.to_str().unwrap()), WeightDType::F32);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dtype_auto_is_f32_on_cpu_and_fixed_values_pass_through() {
        let cpu = Device::Cpu;
        assert_eq!("auto".parse::<DTypeChoice>().unwrap().resolve(&cpu), WeightDType::F32);
        assert_eq!("bf16".parse::<DTypeChoice>().unwrap().resolve(&cpu), WeightDType::BF16);
        assert_eq!("gguf".parse::<DTypeChoice>().unwrap(), DTypeChoice::Fixed(WeightDType::Gguf));
        assert_eq!(DTypeChoice::Auto.to_string(), "auto");
        assert_eq!(DTypeChoice::Fixed(WeightDType::F16).to_string(), "f16");
        let err = "f64".parse::<DTypeChoice>().unwrap_err().to_string();
        assert!(err.contains("f64") && err.contains("auto"), "{err}");
    }

    #[test]
    fn cpu_device_has_no_memory_info() {
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert!(mem_info(&Device::Cpu).unwrap().is_none());
        assert!(pool_usage(&Device::Cpu).unwrap().is_none());
        reset_peak(&Device::Cpu).unwrap();
        synchronize(&Device::Cpu).unwrap();
    }
}
