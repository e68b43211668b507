"""Build sslops and its extension ``sslops._C``.

Build against the torch you already have: ``pip install --no-build-isolation .``
(a plain ``pip install .`` hides that torch in pip's isolated build environment; setup.py
then stops at once and prints this command instead of compiling against a downloaded one).

What gets built, decided from the machine (never from ``torch.cuda.is_available()``,
so a GPU-less build host can still produce a CUDA build):

* the C++ CPU kernels in ``csrc/cpu/*.cpp`` and the schemas in ``csrc/sslops_C.cpp``:
  always, with OpenMP where the compiler supports it;
* the CUDA kernels in ``csrc/cuda/*.cu`` (and the host glue ``csrc/cuda/*.cpp``): when a
  CUDA toolkit (nvcc) is found *and* torch is a CUDA build, or when forced with
  ``SSLOPS_BUILD_CUDA=1``; ``SSLOPS_BUILD_CUDA=0`` turns them off;
* nothing at all with ``SSLOPS_SKIP_EXT=1`` (a pure-Python install: the reference and,
  on CUDA, the Triton kernels still work; no torch needed at build time).

The extension uses only the Python limited API (ops are registered with the dispatcher,
``TORCH_LIBRARY``, no pybind11): one ``_C.abi3.so`` loads on every CPython >= 3.10 with the
torch it was built against. The C++ standard follows that torch (:func:`cxx_standard`).
Release builds carry no debug information (``-g0``, linked with ``-s``);
``SSLOPS_DEBUG=1`` keeps it (``-g``). ``TORCH_CUDA_ARCH_LIST`` selects the GPU
architectures (default ``9.0``, Hopper) and ``MAX_JOBS`` caps the parallel compile jobs
(both read by torch's BuildExtension).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["sslops", "sslops.ops", "sslops.triton_kernels"]
PACKAGE_DIR = {"sslops": "sslops", "sslops.triton_kernels": "triton_kernels"}
# The oldest CPython the limited-API extension supports (torch's own choice since 2.6) and
# the matching wheel tag.
LIMITED_API_HEX = "0x030A0000"
LIMITED_API_TAG = "cp310"

NO_TORCH_MESSAGE = """
sslops compiles its C++/CUDA kernels against the torch that is already installed, and
this build cannot import torch ({error}).

If you ran a plain `pip install .`, pip built sslops in an isolated environment that
hides your torch (and would otherwise download an unrelated multi-GB one). Use:

    pip install --no-build-isolation .          # builds against your torch

or, for the pure-Python package (reference losses everywhere, Triton kernels on CUDA):

    SSLOPS_SKIP_EXT=1 pip install .

If torch is not installed yet, install it first (https://pytorch.org/get-started/).
"""


def _flag(name):
    """Return True/False for an environment switch set to 1/0, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def version_tuple(text):
    """(major, minor, patch) of a version string such as ``2.14.1+cu130`` or ``2.15.0a0``."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def cxx_standard(torch_version):
    """The ``-std=`` value for the C++ and CUDA sources, from the torch being built against.

    torch >= 2.14's headers refuse anything older than C++20 (``#error C++20 or later
    compatible compiler is required``); older ones are built and tested here with C++17.
    """
    return "c++20" if version_tuple(torch_version)[:2] >= (2, 14) else "c++17"


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        sys.stderr.write(NO_TORCH_MESSAGE.format(error=exc))
        sys.stderr.flush()
        raise SystemExit("error: torch is not importable in this build environment; use `pip install --no-build-isolation .`")
    return torch


def _cuda_toolkit_present():
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def _want_cuda(torch):
    forced = _flag("SSLOPS_BUILD_CUDA")
    if forced is not None:
        return forced
    return torch.version.cuda is not None and _cuda_toolkit_present()


def _openmp_flags():
    if sys.platform == "darwin" or os.environ.get("SSLOPS_NO_OPENMP"):
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def compile_flags(torch_version, debug=False):
    """(cxx flags, nvcc flags, link flags) for a build against ``torch_version``."""
    std = "-std=" + cxx_standard(torch_version)
    omp_compile, omp_link = _openmp_flags()
    debug_flags = ["-g"] if debug else ["-g0"]  # -g0 last wins over Python's own CFLAGS (-g)
    cxx = ["-O3", std] + debug_flags + omp_compile
    nvcc = ["-O3", std, "--use_fast_math", "-lineinfo"]
    link = omp_link + ([] if debug else ["-s"])
    return cxx, nvcc, link


def _extensions():
    if _flag("SSLOPS_SKIP_EXT"):
        return [], {}
    torch = _import_torch()
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    cxx, nvcc, link = compile_flags(torch.__version__, debug=bool(_flag("SSLOPS_DEBUG")))
    sources = [os.path.join("csrc", "sslops_C.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    macros = []
    if not hasattr(cpp_extension, "min_supported_cpython"):  # torch < 2.6 does not define it itself
        macros.append(("Py_LIMITED_API", LIMITED_API_HEX))
    kwargs = dict(define_macros=macros, extra_link_args=link, py_limited_api=True)
    if _want_cuda(torch):
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        macros.append(("SSLOPS_WITH_CUDA", None))
        ext = CUDAExtension("sslops._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("sslops._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _version():
    with open(os.path.join(ROOT, "sslops", "_version.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("sslops/_version.py has no __version__")


def main():
    ext_modules, cmdclass = _extensions()
    setup(
        name="sslops",
        version=_version(),
        description="Fast, memory-light, exact self-supervised-learning losses for PyTorch (VICReg, Barlow Twins, InfoNCE, Matrix-SSL)",
        long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
        long_description_content_type="text/markdown",
        license="BSD-3-Clause",
        license_files=["LICENSE"],
        python_requires=">=3.10",
        packages=PACKAGES,
        package_dir=PACKAGE_DIR,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}} if ext_modules else {},
        install_requires=["torch>=2.4"],
        extras_require={
            "triton": ["triton>=3.0"],
            "test": ["pytest>=7", "numpy", "tqdm"],
            "bench": ["tqdm", "matplotlib"],
            "metrics": ["torchmetrics>=1.0"],
            "examples": ["scikit-learn>=1.3", "matplotlib", "tqdm", "torchmetrics>=1.0", "lightning>=2.0"],
        },
        zip_safe=False,
    )


if __name__ == "__main__":  # setuptools runs setup.py as __main__; tests import the helpers above
    main()
