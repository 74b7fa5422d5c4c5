//! The crate's error type, and the one place torch errors are classified.

use tch::TchError;

/// Why a libtorch operation in this crate failed.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    /// The device string is not `cpu`, `cuda` or `cuda:N`.
    #[error("invalid device {spec:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    InvalidDevice {
        /// The string as given.
        spec: String,
    },
    /// A CUDA device was asked for but cannot be used.
    #[error("device {spec:?} requested but CUDA is not usable: {reason}")]
    CudaUnavailable {
        /// The device string as given.
        spec: String,
        /// What is missing, in words an operator can act on.
        reason: String,
    },
    /// Tiling parameters that cannot work together.
    #[error("invalid tiling configuration: {0}")]
    InvalidTiling(String),
    /// The input tensor or job cannot be processed as asked.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The caller's cancellation flag was raised; work stopped between tile batches.
    #[error("cancelled")]
    Cancelled,
    /// The device (or the host, for CPU tensors) ran out of memory.
    #[error("out of memory during {op}: {message}")]
    OutOfMemory {
        /// The operation that failed.
        op: &'static str,
        /// libtorch's message.
        message: String,
    },
    /// The device is unusable for the life of the process: CUDA's
    /// "sticky" errors (an illegal memory access, a device-side assert, a
    /// failed launch, an uncorrectable ECC error, a GPU that fell off the
    /// bus) poison the context, and every later call fails too.
    #[error("device lost during {op}: {message}")]
    DeviceLost {
        /// The operation that failed.
        op: &'static str,
        /// libtorch's message.
        message: String,
    },
    /// A failure of this crate's own machinery (a batch's leader that went
    /// away, a model output of the wrong shape): a server-side bug, not
    /// the caller's input.
    #[error("internal error: {0}")]
    Internal(String),
    /// Any other libtorch failure.
    #[error("torch error during {op}: {source}")]
    Torch {
        /// The operation that failed.
        op: &'static str,
        /// The error as tch reports it.
        #[source]
        source: TchError,
    },
}

impl TorchError {
    /// Classifies a tch error raised by `op`: allocation failures become
    /// [`TorchError::OutOfMemory`] so callers can answer 503 and keep going.
    pub fn from_tch(op: &'static str, source: TchError) -> Self {
        let message = source.to_string();
        if is_out_of_memory(&message) {
            TorchError::OutOfMemory { op, message }
        } else if is_device_lost(&message) {
            TorchError::DeviceLost { op, message }
        } else {
            TorchError::Torch { op, source }
        }
    }
}

impl TorchError {
    /// A copy of this error, for handing one failure of a merged batch to
    /// each of its members (tch's errors are not `Clone`; a libtorch error
    /// keeps its message).
    #[must_use]
    pub fn duplicate(&self) -> Self {
        match self {
            Self::InvalidDevice { spec } => Self::InvalidDevice { spec: spec.clone() },
            Self::CudaUnavailable { spec, reason } => Self::CudaUnavailable {
                spec: spec.clone(),
                reason: reason.clone(),
            },
            Self::InvalidTiling(m) => Self::InvalidTiling(m.clone()),
            Self::InvalidInput(m) => Self::InvalidInput(m.clone()),
            Self::Internal(m) => Self::Internal(m.clone()),
            Self::Cancelled => Self::Cancelled,
            Self::OutOfMemory { op, message } => Self::OutOfMemory {
                op,
                message: message.clone(),
            },
            Self::DeviceLost { op, message } => Self::DeviceLost {
                op,
                message: message.clone(),
            },
            Self::Torch { op, source } => Self::Torch {
                op,
                source: TchError::Torch(source.to_string()),
            },
        }
    }
}

/// CUDA's caching allocator says "CUDA out of memory"; the CPU allocator says
/// "can't allocate memory".
fn is_out_of_memory(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("out of memory") || lower.contains("can't allocate memory")
}

/// CUDA errors after which the context is unusable (the runtime's sticky
/// errors, as PyTorch words them, and a GPU gone from the bus).
const STICKY_CUDA_ERRORS: &[&str] = &[
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "invalid program counter",
    "hardware stack error",
    "launch timed out",
    "uncorrectable ecc error",
    "gpu has fallen off the bus",
    "gpu is lost",
    "cuda driver version is insufficient",
    "context is destroyed",
];

fn is_device_lost(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("cuda") && STICKY_CUDA_ERRORS.iter().any(|s| lower.contains(s))
}

/// Extension to attach the failing operation's name to a tch result.
pub(crate) trait TchResultExt<T> {
    /// Maps the error with [`TorchError::from_tch`].
    fn op(self, op: &'static str) -> Result<T, TorchError>;
}

impl<T> TchResultExt<T> for Result<T, TchError> {
    fn op(self, op: &'static str) -> Result<T, TorchError> {
        self.map_err(|e| TorchError::from_tch(op, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_oom_message_is_out_of_memory() {
        let e = TorchError::from_tch(
            "upsample",
            TchError::Torch(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"
                    .into(),
            ),
        );
        assert!(
            matches!(e, TorchError::OutOfMemory { op: "upsample", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn cpu_allocation_failure_is_out_of_memory() {
        let e = TorchError::from_tch(
            "upsample",
            TchError::Torch(
                "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
                    .into(),
            ),
        );
        assert!(matches!(e, TorchError::OutOfMemory { .. }), "{e:?}");
    }

    #[test]
    fn sticky_cuda_errors_are_device_lost() {
        for message in [
            "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported",
            "CUDA error: device-side assert triggered",
            "CUDA error: unspecified launch failure",
            "CUDA error: uncorrectable ECC error encountered",
        ] {
            let e = TorchError::from_tch("conv", TchError::Torch(message.into()));
            assert!(
                matches!(e, TorchError::DeviceLost { op: "conv", .. }),
                "{message}: {e:?}"
            );
        }
        let e = TorchError::from_tch(
            "conv",
            TchError::Torch("CUDA error: invalid argument".into()),
        );
        assert!(
            matches!(e, TorchError::Torch { .. }),
            "a plain CUDA error: {e:?}"
        );
    }

    #[test]
    fn other_errors_stay_torch_errors() {
        let e = TorchError::from_tch("upsample", TchError::Torch("shape mismatch".into()));
        assert!(
            matches!(e, TorchError::Torch { op: "upsample", .. }),
            "{e:?}"
        );
    }
}
