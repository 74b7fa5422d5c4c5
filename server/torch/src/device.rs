//! Device selection: `cpu`, `cuda` or `cuda:N`.
//!
//! A binary linked on a machine without `libtorch_cuda.so` (every build
//! machine here) does not register libtorch's CUDA backend, so asking for a
//! CUDA device first loads `libtorch_cuda.so` from the directory of the
//! libtorch that is actually mapped into the process (see
//! `shared/design/TORCH.md`). Loading it from anywhere else would mix two
//! libtorch builds in one process.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use tch::Device;

use crate::error::TorchError;

/// A parsed device string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// CUDA device with this ordinal (`cuda` means `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// The tch device this names.
    pub fn to_tch(self) -> Device {
        match self {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(n) => Device::Cuda(n),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = TorchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || TorchError::InvalidDevice { spec: s.to_owned() };
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let ordinal = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                ordinal.parse().map(DeviceSpec::Cuda).map_err(|_| invalid())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The canonical name of a tch device, as reported by `/v1/info`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".to_owned(),
        Device::Vulkan => "vulkan".to_owned(),
    }
}

/// Parses `spec` and makes sure the device can be used: for CUDA, loads the
/// CUDA backend and checks that the ordinal exists. Fails with a message an
/// operator can act on rather than falling back to the CPU.
pub fn open_device(spec: &str) -> Result<Device, TorchError> {
    match spec.parse::<DeviceSpec>()? {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            let unavailable = |reason: String| TorchError::CudaUnavailable {
                spec: spec.to_owned(),
                reason,
            };
            let lib = load_cuda_backend().map_err(|e| unavailable(e.clone()))?;
            if !tch::Cuda::is_available() {
                return Err(unavailable(format!(
                    "{} is loaded but libtorch sees no CUDA device (driver, \
                     NVIDIA_VISIBLE_DEVICES, or a missing GPU resource request)",
                    lib.display()
                )));
            }
            crate::stream::resolve().map_err(unavailable)?;
            let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
            if ordinal >= count {
                return Err(unavailable(format!(
                    "only {count} CUDA device(s) visible, ordinal {ordinal} does not exist"
                )));
            }
            tracing::info!(device = %format!("cuda:{ordinal}"), library = %lib.display(), "CUDA backend ready");
            Ok(Device::Cuda(ordinal))
        }
    }
}

/// The loaded `libtorch_cuda.so`, kept for the life of the process (its
/// static initialisers registered the CUDA hooks; unloading would leave them
/// dangling).
static CUDA_BACKEND: OnceLock<Result<(PathBuf, libloading::Library), String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` once; returns its path.
fn load_cuda_backend() -> Result<&'static Path, &'static String> {
    CUDA_BACKEND
        .get_or_init(|| {
            let path = cuda_library_path()?;
            if !path.exists() {
                return Err(format!(
                    "{} not found: this libtorch is a CPU-only install; run with the GPU \
                     machine's libtorch on LD_LIBRARY_PATH",
                    path.display()
                ));
            }
            open_library(&path)
                .map(|lib| (path.clone(), lib))
                .map_err(|e| format!("loading {} failed: {e}", path.display()))
        })
        .as_ref()
        .map(|(path, _)| path.as_path())
}

/// The loaded `libtorch_cuda.so`, once a CUDA device has been opened.
pub(crate) fn cuda_backend() -> Option<&'static libloading::Library> {
    CUDA_BACKEND
        .get()
        .and_then(|loaded| loaded.as_ref().ok())
        .map(|(_, lib)| lib)
}

/// `libtorch_cuda.so` next to the `libtorch_cpu.so` this process mapped;
/// falls back to the directory the crate was built against.
fn cuda_library_path() -> Result<PathBuf, String> {
    const CUDA_LIB: &str = "libtorch_cuda.so";
    if let Some(dir) = loaded_libtorch_dir() {
        return Ok(dir.join(CUDA_LIB));
    }
    match option_env!("HNDSR_TORCH_BUILD_LIBDIR") {
        Some(dir) => Ok(Path::new(dir).join(CUDA_LIB)),
        None => Err(
            "cannot tell where libtorch is installed (libtorch_cpu.so is not mapped \
                     and no build-time directory is known)"
                .to_owned(),
        ),
    }
}

/// The directory of the `libtorch_cpu.so` mapped into this process, read
/// from `/proc/self/maps` (the path is the last field; it is the only field
/// that contains a `/`).
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.find('/').map(|i| Path::new(&line[i..])))
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name == "libtorch_cpu.so")
        })
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

#[allow(unsafe_code)]
fn open_library(path: &Path) -> Result<libloading::Library, libloading::Error> {
    // SAFETY: loading a shared library runs its static initialisers. The
    // library is `libtorch_cuda.so` from the same directory as the
    // `libtorch_cpu.so` already mapped into this process, i.e. the same
    // libtorch build; its initialisers only register CUDA hooks and
    // operator kernels with that libtorch. The handle is kept for the life
    // of the process; `crate::stream` looks up its C-ABI stream functions.
    unsafe { libloading::Library::new(path) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:0".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(" cpu ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    }

    #[test]
    fn rejects_bad_device_strings() {
        for bad in [
            "", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "cuda0", "mps",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(
                matches!(err, TorchError::InvalidDevice { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(7)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
        assert_eq!(device_name(Device::Cpu), "cpu");
    }

    #[test]
    fn cpu_always_opens() {
        assert_eq!(open_device("cpu").unwrap(), Device::Cpu);
    }

    #[test]
    fn missing_cuda_device_is_a_clear_error() {
        // No machine has 100 GPUs: this fails on CPU-only and GPU hosts alike.
        let err = open_device("cuda:99").unwrap_err();
        assert!(matches!(err, TorchError::CudaUnavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("cuda:99"), "{err}");
    }

    #[test]
    fn finds_the_mapped_libtorch() {
        // Linking tch maps libtorch_cpu.so; force it by touching libtorch.
        let _ = tch::Cuda::is_available();
        let dir = loaded_libtorch_dir().expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").exists(), "{}", dir.display());
    }
}
