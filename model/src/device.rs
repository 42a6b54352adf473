//! Devices by name (`cpu`, `cuda`, `cuda:N`) and the CUDA runtime.
//!
//! flamingo's binaries link only libtorch_cpu. CUDA kernels register
//! themselves when libtorch_cuda.so is loaded, which is found through the
//! binary's rpath to torch's lib/ directory (or LD_LIBRARY_PATH).

use crate::{ModelError, Result};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(text: &str) -> Result<tch::Device> {
    match text {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|index| index.parse().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| ModelError::Device {
                device: other.to_string(),
                message: "not a device (cpu, cuda or cuda:N)".into(),
            }),
    }
}

/// Loads libtorch_cuda.so once, before the first CUDA tensor; a no-op for
/// the CPU. Whether the device exists is the caller's to check
/// (`tch::Cuda::device_count`), so it can name its own flag.
pub fn prepare(device: tch::Device) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    let name = c"libtorch_cuda.so";
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept
    // for the life of the process on purpose (dlopen is reference counted,
    // so calling this again is harmless).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or null.
        let reason = unsafe {
            let error = libc::dlerror();
            if error.is_null() {
                String::from("unknown error")
            } else {
                std::ffi::CStr::from_ptr(error)
                    .to_string_lossy()
                    .into_owned()
            }
        };
        return Err(ModelError::Device {
            device: format!("{device:?}"),
            message: format!(
                "cannot load libtorch_cuda.so ({reason}); this needs the CUDA build of torch 2.11.0 (its lib/ on the binary's rpath or LD_LIBRARY_PATH)"
            ),
        });
    }
    Ok(())
}
