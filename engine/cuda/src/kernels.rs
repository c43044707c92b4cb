//! Our CUDA C++ kernels (kernels/*.cu, embedded in the binary), compiled at run time by
//! NVRTC for this device's architecture and cached on disk as cubin, keyed by a hash of
//! the sources, the defines and the target, so a second start loads them at once.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};

use cudarc::driver::result;
use cudarc::driver::sys::{CUfunction, CUmodule};
use cudarc::nvrtc::sys as nvrtc;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{op_error, OpContext, Result};

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// A kernel source file and the kernels the backend takes from it.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

pub const ELEMENTWISE: Source = Source {
    name: "elementwise",
    code: include_str!("../../../kernels/elementwise.cu"),
    kernels: &["embedding", "gather_rows", "rms_norm", "add_rms_norm", "qk_norm", "rope", "silu_mul"],
};
pub const KV_CACHE: Source =
    Source { name: "kv_cache", code: include_str!("../../../kernels/kv_cache.cu"), kernels: &["write_kv", "attention_prep"] };
pub const GEMV: Source = Source {
    name: "gemv",
    code: include_str!("../../../kernels/gemv.cu"),
    kernels: &["gemv1", "gemv_add_rms1"],
};
pub const SAMPLING: Source =
    Source { name: "sampling", code: include_str!("../../../kernels/sampling.cu"), kernels: &["sample", "logprobs", "adjust_logits"] };
pub const ATTENTION: Source = Source {
    name: "attention",
    code: include_str!("../../../kernels/attention.cu"),
    kernels: &["decode_attention", "decode_reduce", "prefill_attention"],
};

pub const KV_TRANSFER: Source = Source {
    name: "kv_transfer",
    code: include_str!("../../../kernels/kv_transfer.cu"),
    kernels: &["copy_chunks", "publish_progress", "wait_progress"],
};

/// A loaded module and its functions by name. Modules are never unloaded: kernels live
/// as long as the process.
pub struct Module {
    _module: CUmodule,
    functions: HashMap<String, CUfunction>,
}

// SAFETY: module and function handles are plain driver handles, valid in our context.
unsafe impl Send for Module {}

impl Module {
    pub fn function(&self, name: &str) -> Result<CUfunction> {
        self.functions.get(name).copied().ok_or_else(|| op_error("kernel lookup", format!("no kernel `{name}`")))
    }
}

pub struct Compiler {
    arch: String,
    cache_dir: Option<PathBuf>,
}

fn check(op: &'static str, r: nvrtc::nvrtcResult) -> Result<()> {
    if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(op_error(op, format!("{r:?}")))
    }
}

/// Compiles `source` to a cubin with NVRTC. `common.cuh` is provided as an in-memory header.
fn nvrtc_compile(name: &str, source: &str, options: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(source).map_err(|e| op_error("nvrtc", e.to_string()))?;
    let prog_name = CString::new(format!("{name}.cu")).expect("no NUL in names");
    let header = CString::new(COMMON).expect("no NUL in common.cuh");
    let header_name = CString::new("common.cuh").expect("no NUL");
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let opts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).expect("no NUL in options")).collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string for the call's duration;
    // the program is destroyed before returning.
    unsafe {
        check("nvrtcCreateProgram", nvrtc::nvrtcCreateProgram(&mut prog, src.as_ptr(), prog_name.as_ptr(), 1, headers.as_ptr(), header_names.as_ptr()))?;
        let compiled = nvrtc::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let result = if compiled == nvrtc::nvrtcResult::NVRTC_SUCCESS {
            let mut size = 0usize;
            check("nvrtcGetCUBINSize", nvrtc::nvrtcGetCUBINSize(prog, &mut size))?;
            let mut cubin = vec![0u8; size];
            check("nvrtcGetCUBIN", nvrtc::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char))?;
            Ok(cubin)
        } else {
            let mut size = 0usize;
            nvrtc::nvrtcGetProgramLogSize(prog, &mut size);
            let mut log = vec![0u8; size];
            nvrtc::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char);
            Err(op_error("nvrtc compile", format!("{name}.cu: {}", String::from_utf8_lossy(&log).trim_end_matches('\0'))))
        };
        nvrtc::nvrtcDestroyProgram(&mut prog);
        result
    }
}

fn read_cached(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok().filter(|b| !b.is_empty())
}

fn write_cached(path: &Path, cubin: &[u8]) {
    // Write then rename so a concurrent start never reads half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ok = path.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && std::fs::write(&tmp, cubin).is_ok()
        && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        tracing::debug!(path = %path.display(), "could not cache a compiled kernel");
    }
}

impl Compiler {
    pub fn new(arch: String, cache_dir: Option<PathBuf>) -> Self {
        Self { arch, cache_dir }
    }

    /// Compiles (or loads from the cache) and loads one source with `defines`.
    pub fn load(&self, src: Source, defines: &[(&str, String)]) -> Result<Module> {
        let (name, source) = (src.name, src.code);
        let mut options = vec![format!("--gpu-architecture={}", self.arch), "-std=c++17".into(), "--use_fast_math".into()];
        options.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
        let key = xxh3_64(format!("{COMMON}\u{0}{source}\u{0}{options:?}").as_bytes());
        let path = self.cache_dir.as_ref().map(|d| d.join(format!("{name}-{}-{key:016x}.cubin", self.arch)));
        let cubin = match path.as_deref().and_then(read_cached) {
            Some(c) => c,
            None => {
                let started = std::time::Instant::now();
                let c = nvrtc_compile(name, source, &options)?;
                tracing::debug!(kernel = name, ms = started.elapsed().as_millis() as u64, "compiled with NVRTC");
                if let Some(p) = &path {
                    write_cached(p, &c);
                }
                c
            }
        };
        load_module(&cubin, src.kernels)
    }
}

/// Loads a cubin and looks up the named kernels (a missing one is an error now, not at
/// first use).
fn load_module(cubin: &[u8], kernels: &[&str]) -> Result<Module> {
    // SAFETY: the image is a cubin NVRTC produced for this device; it stays loaded for the
    // life of the process (the handle is kept in Module).
    let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }.op("loading kernels")?;
    let mut functions = HashMap::new();
    for &name in kernels {
        let cname = CString::new(name).expect("no NUL");
        // SAFETY: module is live; the name is a NUL-terminated string.
        let f = unsafe { result::module::get_function(module, cname) }
            .map_err(|e| op_error("kernel lookup", format!("`{name}`: {e:?}")))?;
        functions.insert(name.to_owned(), f);
    }
    Ok(Module { _module: module, functions })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PTX of a source, for checking which kernels it defines.
    fn ptx(src: Source, options: &[String]) -> String {
        let code = CString::new(src.code).unwrap();
        let name = CString::new(src.name).unwrap();
        let header = CString::new(COMMON).unwrap();
        let header_name = CString::new("common.cuh").unwrap();
        let opts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: live strings for the duration of the calls; the program is destroyed.
        unsafe {
            nvrtc::nvrtcCreateProgram(&mut prog, code.as_ptr(), name.as_ptr(), 1, [header.as_ptr()].as_ptr(), [header_name.as_ptr()].as_ptr());
            assert_eq!(nvrtc::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr()), nvrtc::nvrtcResult::NVRTC_SUCCESS, "{}", src.name);
            let mut size = 0usize;
            nvrtc::nvrtcGetPTXSize(prog, &mut size);
            let mut buf = vec![0u8; size];
            nvrtc::nvrtcGetPTX(prog, buf.as_mut_ptr() as *mut c_char);
            nvrtc::nvrtcDestroyProgram(&mut prog);
            String::from_utf8_lossy(&buf).into_owned()
        }
    }

    /// Compiles every kernel source for sm_90a where NVRTC can be loaded (no GPU needed),
    /// with the attention specialisations the fixtures and the benchmark shapes use, and
    /// checks that each kernel the backend looks up is defined.
    #[test]
    fn every_kernel_compiles_and_is_defined() {
        let available = std::panic::catch_unwind(|| {
            let (mut a, mut b) = (0, 0);
            // SAFETY: plain out-parameters.
            unsafe { nvrtc::nvrtcVersion(&mut a, &mut b) }
        });
        if available.is_err() {
            eprintln!("skipping: libnvrtc is not loadable here");
            return;
        }
        let arch = "--gpu-architecture=sm_90a".to_string();
        let check = |src: Source, options: &[String]| {
            nvrtc_compile(src.name, src.code, options).unwrap();
            let ptx = ptx(src, options);
            for k in src.kernels {
                assert!(ptx.contains(&format!(".entry {k}(")), "{}.cu defines no kernel `{k}`", src.name);
            }
        };
        for src in [ELEMENTWISE, KV_CACHE, KV_TRANSFER, GEMV, SAMPLING] {
            check(src, std::slice::from_ref(&arch));
        }
        for (d, g, kv) in [(128, 4, 8), (128, 2, 8), (64, 4, 8), (32, 2, 2), (16, 1, 4), (32, 4, 2)] {
            let mut options = vec![arch.clone()];
            options.extend([format!("-DHEAD_DIM={d}"), format!("-DGROUP={g}"), format!("-DKV_HEADS={kv}"), "-DBLOCK_SIZE=16".into()]);
            check(ATTENTION, &options);
        }
    }
}
