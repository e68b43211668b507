"""Build sslops and its extension ``sslops._C``.

What gets built, decided from the machine (never from ``torch.cuda.is_available()``,
so a GPU-less build host can still produce a CUDA build):

* the C++ CPU kernels in ``csrc/cpu/*.cpp`` and the schemas in ``csrc/sslops_C.cpp``:
  always, with OpenMP where the compiler supports it;
* the CUDA kernels in ``csrc/cuda/*.cu`` (and the host glue ``csrc/cuda/*.cpp``): when a
  CUDA toolkit (nvcc) is found *and* torch is a CUDA build, or when forced with
  ``SSLOPS_BUILD_CUDA=1``; ``SSLOPS_BUILD_CUDA=0`` turns them off;
* nothing at all with ``SSLOPS_SKIP_EXT=1`` (a pure-Python install: the reference and,
  on CUDA, the Triton kernels still work).

``TORCH_CUDA_ARCH_LIST`` selects the GPU architectures (default ``9.0``, Hopper) and
``MAX_JOBS`` caps the parallel compile jobs (both read by torch's BuildExtension).

Build against the torch you already have: ``pip install --no-build-isolation .``
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["sslops", "sslops.ops", "sslops.triton_kernels"]
PACKAGE_DIR = {"sslops": "sslops", "sslops.triton_kernels": "triton_kernels"}


def _flag(name):
    """Return True/False for an environment switch set to 1/0, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _cuda_toolkit_present():
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def _want_cuda():
    forced = _flag("SSLOPS_BUILD_CUDA")
    if forced is not None:
        return forced
    import torch

    return torch.version.cuda is not None and _cuda_toolkit_present()


def _openmp_flags():
    if sys.platform == "darwin" or os.environ.get("SSLOPS_NO_OPENMP"):
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _extensions():
    if _flag("SSLOPS_SKIP_EXT"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    omp_compile, omp_link = _openmp_flags()
    sources = [os.path.join("csrc", "sslops_C.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17"] + omp_compile
    macros = []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        macros.append(("SSLOPS_WITH_CUDA", None))
        ext = CUDAExtension(
            "sslops._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=omp_link,
        )
    else:
        ext = CppExtension("sslops._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=omp_link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _version():
    with open(os.path.join(ROOT, "sslops", "_version.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("sslops/_version.py has no __version__")


ext_modules, cmdclass = _extensions()

setup(
    name="sslops",
    version=_version(),
    description="Fast, memory-light, exact self-supervised-learning losses for PyTorch (VICReg, Barlow Twins, InfoNCE, Matrix-SSL)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7", "numpy", "tqdm"],
        "bench": ["tqdm", "matplotlib"],
        "metrics": ["torchmetrics>=1.0"],
        "examples": ["scikit-learn>=1.3", "matplotlib", "tqdm"],
    },
    zip_safe=False,
)
