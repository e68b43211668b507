"""Check that the extension's sources compile against a given torch's headers (no linking).

    python .ci/cxx_check.py                           # every csrc C++ source, this torch's headers
    python .ci/cxx_check.py --torch 2.14.1            # against torch 2.14.1's headers (fetched once, cached)
    python .ci/cxx_check.py --torch 2.14.1 --cuda     # the .cu files too (nvcc, sm_90, full compile: slower)

C++ sources get ``g++ -fsyntax-only``; ``.cu`` files a real ``nvcc -c`` (nvcc has no
syntax-only mode). The language standard is setup.py's choice for that torch version
(:func:`setup.cxx_standard`), the macros those of setup.py's build (limited API, CUDA on).
Headers of another torch version come from its wheel: ``pip download torch==V --no-deps``
(the configured index; on the CPU machines 2.13.0 and 2.14.1 lie on local disk), of which
only ``torch/include`` is unpacked into ``$SSLOPS_CACHE`` (default ``~/.cache/sslops``)
``/torch-headers/V``. Exit status: the number of files that failed (0: all compiled).
Used by tests/test_packaging.py (item: sslops builds on every torch from 2.11 to 2.14).
"""

import argparse
import concurrent.futures
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    """setup.py's helpers (importing it does not run setup(): that happens only as __main__)."""
    spec = importlib.util.spec_from_file_location("sslops_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_dir():
    return os.environ.get("SSLOPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sslops")


def torch_headers(version):
    """The ``include`` folder of torch ``version``: this torch's own, or unpacked from its wheel (cached)."""
    import torch

    if version in (None, "", torch.__version__, torch.__version__.split("+")[0]):
        return os.path.join(os.path.dirname(torch.__file__), "include")
    target = os.path.join(cache_dir(), "torch-headers", version)
    include = os.path.join(target, "include")
    if os.path.isfile(os.path.join(include, "torch", "library.h")):
        return include
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                               "-d", tmp, f"torch=={version}"], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "torch-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not get torch=={version}: {proc.stderr.strip()[-800:]}")
        partial = target + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith("torch/include/") and not name.endswith("/"):
                    wheel.extract(name, partial)
                elif name == "torch/version.py":
                    wheel.extract(name, partial)
        os.replace(os.path.join(partial, "torch", "include"), os.path.join(partial, "include"))
        os.replace(os.path.join(partial, "torch", "version.py"), os.path.join(partial, "version.py"))
        shutil.rmtree(os.path.join(partial, "torch"), ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return include


def sources(cuda, include):
    """The C++ sources; with ``cuda`` the .cu files too, and the CUDA host glue (csrc/cuda/*.cpp,
    which needs c10/cuda) where these headers have it (a CPU build of torch ships none)."""
    files = [os.path.join(ROOT, "csrc", "sslops_C.cpp")] + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    if cuda:
        if os.path.isfile(os.path.join(include, "c10", "cuda", "CUDAStream.h")):
            files += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        files += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return files


def command(source, include, std, cuda, out_dir):
    setup = _setup_module()
    includes = [include, os.path.join(include, "torch", "csrc", "api", "include"), sysconfig.get_paths()["include"]]
    if cuda:
        cuda_home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")))
        includes.append(os.path.join(cuda_home, "include"))
    macros = [f"-DPy_LIMITED_API={setup.LIMITED_API_HEX}", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-D_GLIBCXX_USE_CXX11_ABI=1"] + (["-DSSLOPS_WITH_CUDA"] if cuda else [])
    flags = [f"-I{p}" for p in includes] + macros
    if source.endswith(".cu"):
        return ["nvcc", "-c", source, "-o", os.path.join(out_dir, os.path.basename(source) + ".o"), f"-std={std}", "-O3",
                "-arch=sm_90", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-D__CUDA_NO_HALF_OPERATORS__",
                "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"] + flags
    return [os.environ.get("CXX", "g++"), "-fsyntax-only", f"-std={std}", "-fopenmp", "-fPIC", source] + flags


def check(version=None, cuda=False, jobs=2, files=None):
    """[(source, returncode, output)] of compiling every source against torch ``version``'s headers."""
    include = torch_headers(version)
    version_text = version
    if not version_text:
        import torch

        version_text = torch.__version__
    std = _setup_module().cxx_standard(version_text)
    with tempfile.TemporaryDirectory() as out_dir:
        def one(src):
            proc = subprocess.run(command(src, include, std, cuda, out_dir), capture_output=True, text=True)
            return src, proc.returncode, proc.stdout + proc.stderr

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, files or sources(cuda, include))), std, include


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch", default=None, help="torch version whose headers to use (default: the installed torch)")
    p.add_argument("--cuda", action="store_true", help="also the CUDA sources (.cu with nvcc, stream.cpp)")
    p.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    p.add_argument("files", nargs="*")
    args = p.parse_args(argv)
    results, std, include = check(args.torch, args.cuda, args.jobs, [os.path.abspath(f) for f in args.files] or None)
    failed = 0
    for src, rc, output in results:
        rel = os.path.relpath(src, ROOT)
        if rc:
            failed += 1
            errors = [line for line in output.splitlines() if "error" in line.lower()]
            print(f"FAILED {rel} (-std={std}, {include}):\n  " + "\n  ".join(errors[:20] or output.splitlines()[-20:]))
        else:
            print(f"ok     {rel} (-std={std})")
    return failed


if __name__ == "__main__":
    sys.exit(main())
