//! Devices (a leaf: candle only): `--device auto|cpu|cuda[:N]`, the device's name in reports,
//! and its memory counters. The dtype choice is in [`crate::models::dtype`].
use anyhow::{bail, Context, Result};
use candle_core::{Device, DeviceLocation};

/// `--device cpu|cuda[:N]|auto`: `auto` is GPU 0 when this binary has CUDA (`--features cuda`)
/// and a GPU is visible, else the CPU.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            let d = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
            tracing::debug!("--device auto: {}", device_name(&d));
            Ok(d)
        }
        s if s.starts_with("cuda") => {
            let n: usize = s
                .strip_prefix("cuda")
                .and_then(|r| r.strip_prefix(':'))
                .unwrap_or("0")
                .parse()
                .with_context(|| format!("--device {s}: expected cuda or cuda:N"))?;
            Device::new_cuda(n).with_context(|| format!("--device {s}: this binary has no CUDA support or no GPU {n} is visible (build with --features cuda)"))
        }
        other => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
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
    fn cpu_device_has_no_memory_info() {
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert!(mem_info(&Device::Cpu).unwrap().is_none());
        assert!(pool_usage(&Device::Cpu).unwrap().is_none());
        reset_peak(&Device::Cpu).unwrap();
        synchronize(&Device::Cpu).unwrap();
    }
}
