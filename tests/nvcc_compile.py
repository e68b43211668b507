"""Compile one csrc/cuda/*.cu file with nvcc the way setup.py's CUDA build would.

    python tests/nvcc_compile.py csrc/cuda/column_moments.cu [-o out.o]

Used by the CUDA compile lane (tests/test_cuda_compile.py) on machines where nvcc exists
but torch may be a CPU build: the .cu files must compile against torch's headers without
c10/cuda or ATen/cuda (see csrc/cuda/stream.h). Exits with nvcc's status.
"""

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile


def _cxx_standard(torch_version):
    """setup.py's choice of C++ standard for this torch (C++20 from torch 2.14)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sslops_setup", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cxx_standard(torch_version)


def nvcc_command(source, output, arch=None):
    from torch.utils import cpp_extension

    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH")
    arch = arch or os.environ.get("SSLOPS_NVCC_ARCH", "sm_90")
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], os.path.dirname(os.path.abspath(source))]
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        nvcc, "-c", source, "-o", output,
        f"-std={_cxx_standard(torch.__version__)}", "-O3", f"-arch={arch}", "--use_fast_math", "-lineinfo",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DSSLOPS_WITH_CUDA", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
    ] + [f"-I{p}" for p in includes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("-o", "--output")
    parser.add_argument("--arch")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        output = args.output or os.path.join(tmp, "out.o")
        cmd = nvcc_command(args.source, output, args.arch)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        if proc.returncode == 0:
            print(f"compiled {args.source}")
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
