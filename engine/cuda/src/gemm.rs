//! Matrix products `y = x · wᵀ` (weights in Hugging Face layout [m, k]): our GEMV kernel
//! for a handful of rows (decode at small batch is a pure weight read), cuBLAS in bf16
//! with f32 accumulation otherwise.

use std::ffi::c_void;

use cudarc::cublas::result as cublas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::{CUfunction, CUstream};

use crate::error::{OpContext, Result};
use crate::launch::{launch, Arg, Launch};
use crate::memory::DeviceBuffer;

/// Rows up to which the GEMV kernel beats cuBLAS (its register tile holds 8 rows).
pub const GEMV_MAX_ROWS: usize = 8;
const GEMV_WARPS: usize = 8;
const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Gemm {
    handle: cublasHandle_t,
    _workspace: DeviceBuffer,
    gemv: CUfunction,
}

// SAFETY: the cuBLAS handle is used only from the thread that currently owns the backend.
unsafe impl Send for Gemm {}

impl Gemm {
    pub fn new(stream: CUstream, gemv: CUfunction) -> Result<Self> {
        let handle = cublas::create_handle().op("cublasCreate")?;
        let workspace = DeviceBuffer::new(WORKSPACE_BYTES)?;
        // SAFETY: live handle, our stream; a fixed workspace keeps cuBLAS from allocating
        // during CUDA-graph capture.
        unsafe {
            cublas::set_stream(handle, stream as _).op("cublasSetStream")?;
            cudarc::cublas::sys::cublasSetWorkspace_v2(handle, workspace.ptr() as *mut c_void, WORKSPACE_BYTES)
                .result()
                .op("cublasSetWorkspace")?;
        }
        Ok(Self { handle, _workspace: workspace, gemv })
    }

    /// y[n, m] = x[n, k] · w[m, k]ᵀ, all bf16 row-major.
    pub fn linear(&self, stream: CUstream, x: u64, w: u64, y: u64, n: usize, k: usize, m: usize) -> Result<()> {
        if n <= GEMV_MAX_ROWS && k % 8 == 0 {
            let cfg = Launch::new((m.div_ceil(GEMV_WARPS) as u32, 1, 1), (GEMV_WARPS * 32) as u32);
            return launch(
                "gemv",
                self.gemv,
                stream,
                &cfg,
                vec![Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(y), Arg::I32(n as i32), Arg::I32(k as i32), Arg::I32(m as i32)],
            );
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: y (m x n) = op(w) (m x k) · x (k x n), with w stored k x m.
        // SAFETY: pointers address n*k, m*k and n*m bf16 elements allocated by the caller.
        unsafe {
            cublas::gemm_ex(
                self.handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const c_void,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                cudaDataType::CUDA_R_16BF,
                m as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .op("cublasGemmEx")
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: created in new, destroyed once.
        unsafe {
            let _ = cublas::destroy_handle(self.handle);
        }
    }
}
