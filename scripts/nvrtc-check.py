#!/usr/bin/env python3
"""Compile-checks kernels/*.cu with NVRTC for sm_90a without a GPU (NVRTC and ptxas come
from the nvidia-cuda-nvrtc / nvidia-cuda-nvcc wheels), and prints ptxas resource usage.
Usage: nvrtc-check.py CUDA_ROOT [KEY=VALUE defines for attention.cu]"""
import ctypes, os, subprocess, sys, glob, tempfile

root = sys.argv[1]
defines = [f"-D{d}" for d in (sys.argv[2:] or ["HEAD_DIM=128", "GROUP=4", "KV_HEADS=8", "BLOCK_SIZE=16"])]
lib = ctypes.CDLL(glob.glob(os.path.join(root, "lib", "libnvrtc.so.*"))[0])
here = os.path.join(os.path.dirname(__file__), "..", "kernels")
ok = True
for path in sorted(glob.glob(os.path.join(here, "*.cu"))):
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None) == 0
    opts = [b"--gpu-architecture=sm_90a", b"-std=c++17", b"--use_fast_math", f"-I{here}".encode(),
            ] + [d.encode() for d in defines]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    res = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode()
    print(f"== {os.path.basename(path)}: {'OK' if res == 0 else 'FAILED'}")
    if text.strip():
        print(text)
    if res != 0:
        ok = False
        continue
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    with tempfile.NamedTemporaryFile(suffix=".ptx", delete=False) as f:
        f.write(ptx.value)
    out = subprocess.run([os.path.join(root, "bin", "ptxas"), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True)
    for line in (out.stderr or "").splitlines():
        if "Compiling entry" in line or "Used" in line or "spill" in line.lower() and "0 bytes spill" not in line:
            print("  ", line.strip())
sys.exit(0 if ok else 1)
