//! `--dtype auto|f32|f16|bf16|gguf`: `auto` is bf16 on a GPU; on the CPU it is `gguf` for a GGUF
//! checkpoint and f32 otherwise (f32 is the reference path and stays available everywhere for
//! golden checks).
use super::weights::WeightDType;
use anyhow::Result;
use candle_core::Device;

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
        let gguf =
            || super::registry::resolve(model).is_ok_and(|r| matches!(r.location, super::registry::Location::Gguf(_)));
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
}
