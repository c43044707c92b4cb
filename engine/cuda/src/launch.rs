//! Launching a kernel: arguments are passed as pointers to host values of the exact C
//! types the kernel declares (u64 for pointers, i32 for int, f32 for float).

use std::ffi::c_void;

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction, CUstream};

use crate::error::{OpContext, Result};

/// One kernel argument, owned until the launch call returns.
pub enum Arg {
    Ptr(u64),
    U64(u64),
    I32(i32),
    U32(u32),
    F32(f32),
}

impl Arg {
    fn as_void(&mut self) -> *mut c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        }
    }
}

pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Launch {
    pub fn new(grid: (u32, u32, u32), block: u32) -> Self {
        Self { grid, block: (block, 1, 1), shared_bytes: 0 }
    }
}

/// Launches `f` on `stream`. Every device pointer among `args` must stay valid until the
/// kernel has run (stream order guarantees it for our pool and buffers).
pub fn launch(op: &'static str, f: CUfunction, stream: CUstream, cfg: &Launch, mut args: Vec<Arg>) -> Result<()> {
    if cfg.grid.0 == 0 || cfg.grid.1 == 0 || cfg.grid.2 == 0 {
        return Ok(());
    }
    let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(Arg::as_void).collect();
    // SAFETY: `ptrs` point at `args`, alive for the call; the kernel's parameter list
    // matches the argument types at every call site (checked by the GPU tests).
    unsafe { result::launch_kernel(f, cfg.grid, cfg.block, cfg.shared_bytes, stream, &mut ptrs) }.op(op)
}
