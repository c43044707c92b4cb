//! Driver, cuBLAS and NVRTC failures as the engine's `BackendError`, naming the operation.

use cudarc::cublas::result::CublasError;
use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use dlengine_engine::error::BackendError;

pub type Result<T> = std::result::Result<T, BackendError>;

pub trait OpContext<T> {
    /// Attaches the name of the operation that failed.
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> OpContext<T> for std::result::Result<T, DriverError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|e| match e.0 {
            CUresult::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory(format!("{op}: {e:?}")),
            _ => BackendError::Op { op, message: format!("{e:?}") },
        })
    }
}

impl<T> OpContext<T> for std::result::Result<T, CublasError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|e| BackendError::Op { op, message: format!("cuBLAS {e:?}") })
    }
}

pub fn op_error(op: &'static str, message: impl Into<String>) -> BackendError {
    BackendError::Op { op, message: message.into() }
}
