//! One CUDA stream per inference thread.
//!
//! libtorch queues a thread's kernels and copies on that thread's *current*
//! stream, and every thread starts on the device's legacy default stream,
//! which serialises with all other work on the device. Inference threads
//! sharing it queue behind each other, and the copy of each result back to
//! the host waits for every other thread's kernels too. A thread that takes
//! a stream of its own from libtorch's pool ([`use_own_stream`]) runs
//! beside the others, and its synchronising copies wait for its own work
//! only.
//!
//! tch has no stream API. libtorch's stable C ABI
//! (`torch/csrc/stable/c/shim.h` and `aoti_torch/c/shim.h`, exported by
//! `libtorch_cuda.so`, the same functions torchaudio uses) has; they are
//! looked up in the CUDA backend that [`crate::device`] loaded. On the CPU
//! every function here does nothing.
//!
//! A tensor handed from one thread to another crosses streams: the sender
//! calls [`synchronize`] first, so the receiver's stream never reads
//! unfinished data, and a thread that frees memory another stream allocated
//! has synchronised with that stream's last use of it (the caching allocator
//! gives a block back to the stream that allocated it). That happens in
//! two places: merged tile passes ([`crate::hndsr::TileBatcher`]) and model
//! replicas, which one thread loads and others borrow
//! ([`crate::hndsr::HndsrModel::load`] waits for its weights).

use std::ffi::c_void;
use std::sync::OnceLock;

use tch::Device;

use crate::error::TorchError;

/// A CUDA stream's raw handle (`cudaStream_t`), for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamHandle(usize);

impl StreamHandle {
    /// The legacy default stream's handle is null.
    #[must_use]
    pub fn is_default(self) -> bool {
        self.0 == 0
    }
}

impl std::fmt::Display for StreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Makes a stream from libtorch's pool the calling thread's current stream
/// on `device`, for the life of the thread (or until it is changed again).
/// The pool hands its streams out in turn, so threads that call this get
/// different streams (up to the pool's size, 32 per device).
///
/// `Ok(None)` on the CPU (and any device without CUDA streams).
///
/// # Errors
/// When the CUDA backend is not loaded (no [`crate::open_device`] of a CUDA
/// device) or libtorch refuses.
pub fn use_own_stream(device: Device) -> Result<Option<StreamHandle>, TorchError> {
    let Some(index) = cuda_index(device)? else {
        return Ok(None);
    };
    let api = api()?;
    let stream = api
        .stream_from_pool(index)
        .ok_or_else(|| failed(device, "take a stream from libtorch's pool"))?;
    if !api.set_current(stream, index) {
        return Err(failed(
            device,
            "make a pool stream the thread's current stream",
        ));
    }
    Ok(Some(StreamHandle(stream as usize)))
}

/// The calling thread's current stream on `device` (`Ok(None)` on the CPU).
///
/// # Errors
/// As [`use_own_stream`].
pub fn current_stream(device: Device) -> Result<Option<StreamHandle>, TorchError> {
    let Some(index) = cuda_index(device)? else {
        return Ok(None);
    };
    current(api()?, device, index).map(|s| Some(StreamHandle(s as usize)))
}

/// Waits until the work queued on the calling thread's current stream on
/// `device` has finished. Nothing to wait for on the CPU.
///
/// # Errors
/// As [`use_own_stream`]; a failed synchronisation is reported as
/// [`TorchError::DeviceLost`]: waiting on a stream fails only when a kernel
/// queued on it hit a CUDA error, and those poison the context.
pub fn synchronize(device: Device) -> Result<(), TorchError> {
    let Some(index) = cuda_index(device)? else {
        return Ok(());
    };
    let api = api()?;
    let stream = current(api, device, index)?;
    if api.synchronize(stream, index) {
        Ok(())
    } else {
        Err(TorchError::DeviceLost {
            op: "synchronize a CUDA stream",
            message: "libtorch reported the CUDA error in its log".to_owned(),
        })
    }
}

/// The CUDA ordinal of `device`; `None` for devices without CUDA streams.
fn cuda_index(device: Device) -> Result<Option<i32>, TorchError> {
    match device {
        Device::Cuda(n) => i32::try_from(n)
            .map(Some)
            .map_err(|_| TorchError::InvalidInput(format!("CUDA ordinal {n} is out of range"))),
        Device::Cpu | Device::Mps | Device::Vulkan => Ok(None),
    }
}

fn current(api: &ffi::Api, device: Device, index: i32) -> Result<*mut c_void, TorchError> {
    api.current(index)
        .ok_or_else(|| failed(device, "read the thread's current stream"))
}

fn failed(device: Device, what: &str) -> TorchError {
    TorchError::Internal(format!(
        "cannot {what} on {} (libtorch logged why)",
        crate::device_name(device)
    ))
}

/// Looks the stream functions up in the loaded CUDA backend; called by
/// [`crate::open_device`], so a libtorch without them is refused at
/// start-up rather than at the first request.
pub(crate) fn resolve() -> Result<(), String> {
    api_or_reason().map(|_| ())
}

fn api() -> Result<&'static ffi::Api, TorchError> {
    api_or_reason().map_err(|reason| TorchError::CudaUnavailable {
        spec: "cuda".to_owned(),
        reason,
    })
}

fn api_or_reason() -> Result<&'static ffi::Api, String> {
    static API: OnceLock<Result<ffi::Api, String>> = OnceLock::new();
    // Not cached until the backend is loaded: a CUDA device opened later
    // still gets its streams.
    let lib = crate::device::cuda_backend().ok_or_else(|| {
        "CUDA streams: the CUDA backend is not loaded (open a CUDA device first)".to_owned()
    })?;
    API.get_or_init(|| ffi::Api::resolve(lib))
        .as_ref()
        .map_err(|reason| format!("CUDA streams: {reason}"))
}

/// The four functions of libtorch's C ABI this module calls.
#[allow(unsafe_code)]
mod ffi {
    use super::c_void;

    /// `AOTITorchError`: `int32_t`, 0 on success (`aoti_torch/c/macros.h`).
    const SUCCESS: i32 = 0;

    type FromPool = unsafe extern "C" fn(bool, i32, *mut *mut c_void) -> i32;
    type SetCurrent = unsafe extern "C" fn(*mut c_void, i32) -> i32;
    type Current = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;
    type Synchronize = unsafe extern "C" fn(*mut c_void, i32) -> i32;

    /// Function pointers into `libtorch_cuda.so`, which stays loaded for
    /// the life of the process.
    #[derive(Debug)]
    pub(super) struct Api {
        from_pool: FromPool,
        set_current: SetCurrent,
        current: Current,
        synchronize: Synchronize,
    }

    impl Api {
        pub(super) fn resolve(lib: &'static libloading::Library) -> Result<Self, String> {
            Ok(Self {
                from_pool: lookup(lib, b"torch_get_cuda_stream_from_pool\0")?,
                set_current: lookup(lib, b"torch_set_current_cuda_stream\0")?,
                current: lookup(lib, b"aoti_torch_get_current_cuda_stream\0")?,
                synchronize: lookup(lib, b"torch_cuda_stream_synchronize\0")?,
            })
        }

        pub(super) fn stream_from_pool(&self, device: i32) -> Option<*mut c_void> {
            let mut stream = std::ptr::null_mut();
            // SAFETY: `torch_get_cuda_stream_from_pool(bool isHighPriority,
            // int32_t device_index, void** ret_stream)` (stable/c/shim.h of
            // the pinned torch 2.11.0) writes a `cudaStream_t` into
            // `stream`, a valid out-pointer; C++ exceptions are turned into
            // an error code inside it.
            let rc = unsafe { (self.from_pool)(false, device, &raw mut stream) };
            (rc == SUCCESS).then_some(stream)
        }

        pub(super) fn set_current(&self, stream: *mut c_void, device: i32) -> bool {
            // SAFETY: `torch_set_current_cuda_stream(void* stream, int32_t
            // device_index)`; `stream` came from libtorch's pool for this
            // device, and pool streams live as long as the process.
            unsafe { (self.set_current)(stream, device) == SUCCESS }
        }

        pub(super) fn current(&self, device: i32) -> Option<*mut c_void> {
            let mut stream = std::ptr::null_mut();
            // SAFETY: `aoti_torch_get_current_cuda_stream(int32_t
            // device_index, void** ret_stream)` (aoti_torch/c/shim.h of
            // torch 2.11.0) writes the thread's current stream into a valid
            // out-pointer.
            let rc = unsafe { (self.current)(device, &raw mut stream) };
            (rc == SUCCESS).then_some(stream)
        }

        pub(super) fn synchronize(&self, stream: *mut c_void, device: i32) -> bool {
            // SAFETY: `torch_cuda_stream_synchronize(void* stream, int32_t
            // device_index)` on a stream libtorch reported as current.
            unsafe { (self.synchronize)(stream, device) == SUCCESS }
        }
    }

    fn lookup<T: Copy>(lib: &'static libloading::Library, name: &[u8]) -> Result<T, String> {
        // SAFETY: `T` is one of the function-pointer types above, each
        // matching its C declaration in the pinned libtorch's headers; the
        // library is never unloaded, so the copied pointer stays valid.
        unsafe { lib.get::<T>(name) }.map(|f| *f).map_err(|e| {
            format!(
                "libtorch_cuda.so has no {}: not the libtorch this server was built for ({e})",
                String::from_utf8_lossy(&name[..name.len() - 1])
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_streams_and_nothing_to_wait_for() {
        assert_eq!(use_own_stream(Device::Cpu).unwrap(), None);
        assert_eq!(current_stream(Device::Cpu).unwrap(), None);
        synchronize(Device::Cpu).unwrap();
    }

    #[test]
    fn only_cuda_devices_have_streams() {
        for device in [Device::Mps, Device::Vulkan] {
            assert_eq!(use_own_stream(device).unwrap(), None);
            synchronize(device).unwrap();
        }
    }

    #[test]
    fn cuda_streams_need_the_cuda_backend() {
        if crate::device::cuda_backend().is_some() {
            return; // a GPU machine: the cuda-tests cover it.
        }
        let err = use_own_stream(Device::Cuda(0)).unwrap_err();
        assert!(
            matches!(&err, TorchError::CudaUnavailable { reason, .. } if reason.contains("not loaded")),
            "{err:?}"
        );
        assert!(resolve().is_err());
    }

    #[test]
    fn the_null_handle_is_the_default_stream() {
        assert!(StreamHandle(0).is_default());
        assert!(!StreamHandle(0x1234).is_default());
        assert_eq!(StreamHandle(0x1234).to_string(), "0x1234");
    }
}
