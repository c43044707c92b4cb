//! A 2-D tensor in device memory: a pointer, a shape, a dtype, and what keeps it alive.

use std::sync::Arc;

use dlengine_engine::backend::DType;

use crate::memory::{DeviceBuffer, Lease};

pub enum Storage {
    Pooled(Lease),
    Owned(Arc<DeviceBuffer>),
}

pub struct CudaTensor {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    _storage: Storage,
}

impl CudaTensor {
    pub fn new(storage: Storage, rows: usize, cols: usize, dtype: DType) -> Self {
        let ptr = match &storage {
            Storage::Pooled(l) => l.ptr(),
            Storage::Owned(b) => b.ptr(),
        };
        Self { ptr, rows, cols, dtype, _storage: storage }
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
}
