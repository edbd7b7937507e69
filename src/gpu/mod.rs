//! Running on a GPU: device and dtype resolution, the device-memory guard, golden checks that
//! run without cargo (`check-goldens`), and the paired-episode speed workload (`bench paired`).
//! Everything here also runs on the CPU, where it is tested; see docs/cuda.md.
pub mod device;
pub mod goldens;
pub mod memory;
pub mod paired;
