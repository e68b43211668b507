"""Load the compiled extension ``sslops._C`` if it was built, and remember why not.

The extension registers the C++ ops (``torch.ops.sslops.*_cxx``): CPU kernels always,
CUDA kernels when it was built with a CUDA toolkit. ``import sslops`` never fails
because of it; ``sslops.backends()`` reports the reason instead.
"""

import torch  # noqa: F401  (the extension links against torch's libraries)

try:
    from . import _C  # noqa: F401

    LOADED = True
    REASON = "compiled extension sslops._C loaded"
except ImportError as exc:  # a pure-Python install (SSLOPS_SKIP_EXT=1) or a broken build
    _C = None
    LOADED = False
    REASON = f"sslops._C is not importable ({exc}); reinstall with `pip install --no-build-isolation .`"


# Read once at import: plain Python values, so backend choice traces under torch.compile.
BUILT_WITH_CUDA = LOADED and bool(_C.built_with_cuda())
BUILT_WITH_OPENMP = LOADED and bool(_C.built_with_openmp())


def has_cuda_kernels():
    """True when the extension was compiled with its CUDA kernels."""
    return BUILT_WITH_CUDA


def cpu_capability():
    """The vector instruction set the C++ CPU kernels' inner loops run at now.

    ``"default"`` (the build's baseline: SSE2 on x86-64), ``"avx2"`` (AVX2 + FMA) or
    ``"avx512"`` (AVX-512 F/BW/DQ/VL): the best this CPU supports, capped by the environment
    variable ``SSLOPS_CPU_CAPABILITY`` (the same three names; read at every kernel call). The
    loops are compiled for all three by GCC on x86-64; elsewhere only ``"default"`` exists.
    ``None`` without the compiled extension. Raises ``ValueError`` when
    ``SSLOPS_CPU_CAPABILITY`` is set to anything else.
    """
    if not LOADED or not hasattr(_C, "cpu_capability"):
        return None
    return _C.cpu_capability()
