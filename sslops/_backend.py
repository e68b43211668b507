"""Backend choice, in one place.

A *backend* is a family of kernels: ``"triton"`` (GPU, or CPU tensors under
``TRITON_INTERPRET=1``), ``"cuda"`` (CUDA C++ in ``sslops._C``), ``"cpu"`` (C++/OpenMP
in ``sslops._C``) and ``"reference"`` (the pure-PyTorch math of ``sslops.reference``,
always available). ``"auto"`` picks, per loss, device and shape, the fastest backend
that is available *and verified* on that device: a CUDA C++ kernel that has never run
on a GPU is registered with ``cuda_verified=False`` and only runs when asked for by name.

The ``backend`` argument of every loss, or the environment variable ``SSLOPS_BACKEND``
when the argument is ``"auto"``/``None``, selects it. Asking for a backend that cannot
run raises :class:`BackendUnavailableError` with the reason.

Each ``sslops/ops/<stem>.py`` registers its kernels with :func:`register_kernels`:
a mapping from backend name to a callable taking the loss's tensors and keyword
hyperparameters and returning the (differentiable) loss.
"""

import dataclasses
import importlib.metadata
import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

from . import _extension

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


@dataclasses.dataclass
class KernelSet:
    """The kernels one loss has, by backend, and how ``auto`` chooses among them."""

    impls: Dict[str, Callable]
    cuda_verified: bool = False  # the CUDA C++ kernels have run and passed the GPU lane on a GPU
    triton_verified: bool = False  # the Triton kernels have run and passed the GPU lane on a GPU
    # prefer(device, shapes) -> ordered backend names to try for "auto"; None = default order
    prefer: Optional[Callable] = None


_KERNELS: Dict[str, KernelSet] = {}


def register_kernels(loss: str, impls: Dict[str, Callable], *, cuda_verified: bool = False,
                     triton_verified: bool = False, prefer=None):
    """Make ``impls`` (backend name -> callable) the kernels of ``loss``.

    ``cuda_verified``/``triton_verified``: set only once that backend's kernels for this
    loss have run on a GPU and passed the GPU test lane; until then ``auto`` does not pick
    them on CUDA tensors (they still run when named: ``backend="triton"``).
    """
    unknown = set(impls) - set(KERNEL_BACKENDS)
    if unknown:
        raise ValueError(f"register_kernels({loss!r}): unknown backends {sorted(unknown)}")
    _KERNELS[loss] = KernelSet(dict(impls), cuda_verified, triton_verified, prefer)


def kernel_impl(loss: str, backend: str) -> Callable:
    return _KERNELS[loss].impls[backend]


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _find_triton():
    """(installed, version) without importing triton (importing it is slow)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False, ""
    except (ImportError, ValueError):
        return False, ""
    try:
        return True, importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return True, "?"


# What this process can run, read once at import (plain values: resolve() traces under
# torch.compile(fullgraph=True) and costs nothing per call). TRITON_INTERPRET is read at
# import too, as Triton itself does.
_TRITON_INSTALLED, _TRITON_VERSION = _find_triton()
_INTERPRET = interpreting_triton()
_HAS_CUDA_DEVICE = torch.cuda.is_available()  # counts devices; does not create a CUDA context


def _triton_status():
    if not _TRITON_INSTALLED:
        return False, "triton is not installed (pip install triton)"
    if _INTERPRET:
        return True, f"triton {_TRITON_VERSION} in interpreter mode (TRITON_INTERPRET=1): CPU tensors"
    if not _HAS_CUDA_DEVICE:
        return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    return True, f"triton {_TRITON_VERSION} on CUDA devices"


def _cuda_status():
    if not _extension.LOADED:
        return False, _extension.REASON
    if not _extension.BUILT_WITH_CUDA:
        return False, "sslops._C was built without CUDA kernels (no CUDA toolkit or a CPU build of torch at build time)"
    if not _HAS_CUDA_DEVICE:
        return False, "no CUDA device is available"
    return True, "CUDA C++ kernels"


def _cpu_status():
    if not _extension.LOADED:
        return False, _extension.REASON
    return True, "C++ CPU kernels (OpenMP)" if _extension.BUILT_WITH_OPENMP else "C++ CPU kernels (no OpenMP: one thread)"


def _cpu_capability_note():
    """The vector ISA the cpu kernels' loops run at, for backends() (not on the traced path:
    torch.compile cannot trace the extension's function)."""
    try:
        return f"{_extension.cpu_capability()} vector loops"
    except ValueError as exc:  # a bad SSLOPS_CPU_CAPABILITY: every cpu kernel call raises it too
        return str(exc)


def backends() -> Dict[str, dict]:
    """What can run on this machine: ``{name: {"available": bool, "reason": str, "losses": [...]}}``.

    ``losses`` lists the losses with a kernel on that backend (every loss runs on
    ``"reference"``).
    """
    status = {
        "triton": _triton_status(),
        "cuda": _cuda_status(),
        "cpu": _cpu_status(),
        "reference": (True, "pure PyTorch (sslops.reference), every device"),
    }
    if status["cpu"][0]:
        status["cpu"] = (True, f"{status['cpu'][1]}; {_cpu_capability_note()}")
    out = {}
    for name, (ok, why) in status.items():
        if name == "reference":
            losses = sorted(_KERNELS)
        else:
            losses = sorted(loss for loss, ks in _KERNELS.items() if name in ks.impls)
        out[name] = {"available": ok, "reason": why, "losses": losses}
    return out


def _runnable(loss: str, backend: str, device: torch.device):
    """(ok, reason) for running ``loss`` on ``backend`` with tensors on ``device``."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        ok, why = (False, f"the cpu backend needs CPU tensors, got {device.type} tensors") if device.type != "cpu" else _cpu_status()
    elif backend == "cuda":
        ok, why = (False, f"the cuda backend needs CUDA tensors, got {device.type} tensors") if device.type != "cuda" else _cuda_status()
    elif backend == "triton":
        ok, why = _triton_status()
        if ok and device.type == "cpu" and not _INTERPRET:
            ok, why = False, "the triton backend needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        elif ok and device.type not in ("cpu", "cuda"):
            ok, why = False, f"the triton backend does not run on {device.type} tensors"
    else:
        raise AssertionError(backend)
    if ok and (loss not in _KERNELS or backend not in _KERNELS[loss].impls):
        ok, why = False, f"sslops has no {backend} kernel for {loss}"
    return ok, why


def requested(backend: Optional[str]) -> str:
    """The backend asked for: the argument, else ``SSLOPS_BACKEND``, else ``"auto"``."""
    if backend is None or backend == "auto":
        backend = os.environ.get("SSLOPS_BACKEND", "auto") or "auto"
        source = "SSLOPS_BACKEND"
    else:
        source = "backend"
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    return backend


def _auto_order(loss: str, device: torch.device, shapes):
    """Backends ``auto`` tries, best first: the loss's ``prefer`` hook (or the default
    order), less every GPU backend whose kernels have not been verified on a GPU."""
    kernels = _KERNELS.get(loss)
    if kernels is None:
        return []
    if kernels.prefer is not None:
        order = list(kernels.prefer(device, shapes))
    elif device.type == "cuda":
        order = ["triton", "cuda"]
    elif device.type == "cpu":
        order = ["cpu"]
    else:
        order = []
    if device.type == "cuda":
        verified = {"triton": kernels.triton_verified, "cuda": kernels.cuda_verified}
        order = [b for b in order if verified.get(b, True)]
    return order


def resolve(loss: str, backend: Optional[str], device: torch.device, shapes=()) -> str:
    """The concrete backend that runs ``loss`` for tensors on ``device``.

    ``"auto"`` never raises: it falls back to ``"reference"``. A named backend that
    cannot run raises :class:`BackendUnavailableError` saying why.
    """
    name = requested(backend)
    if name == "auto":
        for candidate in _auto_order(loss, device, shapes):
            ok, _ = _runnable(loss, candidate, device)
            if ok and not (device.type == "cpu" and candidate == "triton"):  # the interpreter is for tests only
                return candidate
        return "reference"
    ok, why = _runnable(loss, name, device)
    if not ok:
        raise BackendUnavailableError(f"backend={name!r} cannot run {loss} here: {why}")
    return name


def run(loss: str, backend: Optional[str], tensors, params: dict, reference_fn: Callable):
    """``loss`` on ``tensors`` with the backend ``backend`` resolves to for them (see :func:`resolve`).

    A kernel backend gets the tensors as they are; ``"reference"`` runs ``reference_fn`` on
    the floating-point tensors, those among ``params`` too (a tensor temperature, logit scale
    or bias, a queue of negatives), cast to fp32 (fp64 for fp64), its compute dtype. Shared by
    the single-process losses (:mod:`sslops.functional`) and the gathered-rows paths of
    :mod:`sslops.distributed`, which run the same kernels on the global batch.
    """
    lead = tensors[0]
    name = resolve(loss, backend, lead.device, tuple(t.shape for t in tensors if isinstance(t, torch.Tensor)))
    if name != "reference":
        return kernel_impl(loss, name)(*tensors, **params)
    wide = torch.float64 if lead.dtype == torch.float64 else torch.float32
    def widen(t):
        return t.to(wide) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return reference_fn(*map(widen, tensors), **{key: widen(value) for key, value in params.items()})


def kernel_backends(loss: str, device) -> list:
    """The sslops kernel backends that can run ``loss`` on ``device`` (for benchmarks and tests)."""
    device = torch.device(device)
    return [b for b in KERNEL_BACKENDS if _runnable(loss, b, device)[0]]
