//! Matrix products `y = x · wᵀ` (weights in Hugging Face layout [m, k]): our GEMV kernel
//! for a single row (batch-1 decode is a pure weight read), cuBLAS in bf16 with f32
//! accumulation otherwise.

use std::ffi::c_void;

use cudarc::cublas::result as cublas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::{CUfunction, CUstream};

use crate::error::{OpContext, Result};
use crate::launch::{launch, Arg, Launch};
use crate::kernels::Module;
use crate::memory::DeviceBuffer;

/// Rows up to which the GEMV kernels beat cuBLAS. Variants for 2, 4 and 8 rows lost to it:
/// Qwen3-8B decode TPOT at batch 2/4/8 was 6.6/11.7/19.2 ms with them, 5.4/5.5/6.0 ms with
/// cuBLAS (one run on an H200, 2026-11-21): every weight vector re-read 8 rows of input
/// from shared memory, which bounded them below the memory bandwidth.
pub const GEMV_MAX_ROWS: usize = 1;
/// Resident GEMV blocks per SM in the persistent grid.
const GEMV_BLOCKS_PER_SM: usize = 4;
/// Shared memory the GEMV kernels may stage their input rows in.
const GEMV_SMEM_MAX: usize = 96 << 10;
const GEMV_WARPS: usize = 8;
const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Gemm {
    handle: cublasHandle_t,
    _workspace: DeviceBuffer,
    gemv: CUfunction,
    gemv_add_rms: CUfunction,
    max_blocks: usize,
}

// SAFETY: the cuBLAS handle is used only from the thread that currently owns the backend.
unsafe impl Send for Gemm {}

impl Gemm {
    pub fn new(stream: CUstream, module: &Module, multiprocessors: usize) -> Result<Self> {
        let (gemv, gemv_add_rms) = (module.function("gemv1")?, module.function("gemv_add_rms1")?);
        for f in [gemv, gemv_add_rms] {
            // SAFETY: valid function handles; raising their dynamic shared memory limit.
            unsafe {
                cudarc::driver::result::function::set_function_attribute(
                    f,
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    GEMV_SMEM_MAX as i32,
                )
            }
            .op("GEMV shared memory limit")?;
        }
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
        Ok(Self { handle, _workspace: workspace, gemv, gemv_add_rms, max_blocks: multiprocessors * GEMV_BLOCKS_PER_SM })
    }

    /// Whether the GEMV kernels take `n` input rows of `k` columns (staged in shared memory).
    pub fn gemv_fits(n: usize, k: usize) -> bool {
        n <= GEMV_MAX_ROWS && k % 8 == 0 && n * k * 2 <= GEMV_SMEM_MAX
    }

    fn gemv_launch(&self, n: usize, k: usize, m: usize) -> Launch {
        let blocks = m.div_ceil(GEMV_WARPS).min(self.max_blocks);
        let mut cfg = Launch::new((blocks as u32, 1, 1), (GEMV_WARPS * 32) as u32);
        cfg.shared_bytes = (n * k * 2) as u32;
        cfg
    }

    /// y = RMSNorm(residual + delta) · wᵀ, with residual + delta written to `residual_out`;
    /// only where `gemv_fits(n, k)`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_linear(
        &self,
        stream: CUstream,
        delta: u64,
        residual: u64,
        residual_out: u64,
        norm: u64,
        eps: f32,
        w: u64,
        y: u64,
        (n, k, m): (usize, usize, usize),
    ) -> Result<()> {
        let args = vec![
            Arg::Ptr(delta),
            Arg::Ptr(residual),
            Arg::Ptr(residual_out),
            Arg::Ptr(norm),
            Arg::F32(eps),
            Arg::Ptr(w),
            Arg::Ptr(y),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I32(m as i32),
        ];
        launch("gemv_add_rms", self.gemv_add_rms, stream, &self.gemv_launch(n, k, m), args)
    }

    /// y[n, m] = x[n, k] · w[m, k]ᵀ, all bf16 row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(&self, stream: CUstream, x: u64, w: u64, y: u64, n: usize, k: usize, m: usize) -> Result<()> {
        if Self::gemv_fits(n, k) {
            let args = vec![Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(y), Arg::I32(n as i32), Arg::I32(k as i32), Arg::I32(m as i32)];
            return launch("gemv", self.gemv, stream, &self.gemv_launch(n, k, m), args);
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
