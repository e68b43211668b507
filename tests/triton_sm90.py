"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU, and read their resources.

Why: without a GPU the Triton kernels only ever run under ``TRITON_INTERPRET=1``, which
compiles nothing. Whatever only the compiler sees — a ``tl.dot`` shape or dtype it rejects,
non-constexpr control flow, a block whose registers spill or whose shared memory passes
what an SM has — would first show up on a GPU. This harness catches it on any machine with
triton and its bundled ``ptxas``.

How: Triton's ``JITFunction.run`` asks the *active driver* for the current device, stream and
target, compiles (or fetches from its caches) the specialisation for the arguments given,
and then launches it unless ``warmup`` is set. :func:`sm90_compile_only` installs, for the
duration of a ``with`` block:

* a stand-in driver (:class:`_Sm90Driver`) whose target is ``GPUTarget("cuda", 90, 32)``
  (an H100) and whose device, stream and torch device are dummies (CPU tensors go in);
* a wrapper around ``JITFunction.run`` that forces ``warmup=True`` (compile, never launch)
  and records every compiled kernel;
* an empty per-kernel compile cache (``JITFunction.device_caches``), so that nothing
  compiled for the stand-in target is left for a real driver, and nothing compiled for a
  real device is mistaken for an sm_90 build.

All three are put back on exit, also when the block raises. The real launchers of
``sslops.triton_kernels`` are then called on CPU tensors: every block size, warp count,
dtype and constexpr they choose goes through Triton's full pipeline (TTIR → TTGIR → LLVM →
PTX → cubin; the last step is ``ptxas``). Registers, spill bytes and static shared memory
come from that ``ptxas -v`` log (Triton prints it when ``knobs.nvidia.dump_ptxas_log`` is
set, captured here), or, when the kernel came from Triton's on-disk cache and nothing was
built, from :func:`ptxas_resources`, which reruns the same ``ptxas`` on the PTX with
Triton's flags; :func:`cubin_registers` cross-checks the register count against the cubin
Triton built. Triton's metadata gives the dynamic shared memory.

Limits — this checks compilation and resources, not numbers:

* No kernel runs. Launchers compute on the uninitialised outputs of kernels that never
  ran, so any value they return is garbage; correctness is the interpreter lane's and the
  GPU lane's job.
* Launch-time checks of a real driver do not happen: grid-size limits, the device's
  actual shared-memory opt-in, occupancy. Shared memory and register-file use are checked
  here against H100 limits instead (:data:`SMEM_LIMIT`, :data:`REGFILE`).
* Launcher choices keyed on ``tensor.is_cuda`` take their CPU branch (the tensors are CPU
  tensors); choices keyed on ``torch.cuda.is_available()`` take their CPU branch unless the
  caller patches it (the tests do, for matrix_info's block sizes).
* Only the sm_90 code path of the installed triton is compiled; other architectures and
  other triton versions can differ (register counts move between releases).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import os
import re
import subprocess
import tempfile
from collections import defaultdict
from typing import Dict, Iterator, List, Optional

ARCH = 90
SMEM_LIMIT = 227 * 1024  # dynamic shared memory one block may opt into on sm_90 (bytes)
REG_LIMIT = 255  # registers per thread
REGFILE = 64 * 1024  # 32-bit registers per SM: regs/thread × threads/block must fit


def unavailable_reason() -> Optional[str]:
    """Why the sm_90 compile check cannot run here, or None when it can."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: kernels are interpreted, nothing to compile (run without it)"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        return f"triton with its NVIDIA backend is not installed: {exc}"
    try:
        ptxas_path()
    except RuntimeError as exc:
        return f"no ptxas for the NVIDIA backend: {exc}"
    return None


def ptxas_path() -> str:
    """The ptxas Triton itself uses (``TRITON_PTXAS_PATH`` or the one in the wheel)."""
    from triton import knobs

    return knobs.nvidia.ptxas.path


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class KernelResources:
    """One compiled specialisation of a kernel and what ptxas says it needs per thread/block."""

    kernel: str
    config: str  # constexprs and warps the launcher chose
    variants: List[str]  # labels of the launcher calls that compiled this very binary
    num_warps: int
    regs: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # bytes of local-memory stack frame per thread
    smem: int  # bytes per block: Triton's dynamic shared memory + ptxas's static
    cubin_regs: Optional[int]  # registers of Triton's own cubin (cuobjdump), None without cuobjdump

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def problems(self) -> List[str]:
        """Hard limits of an H100 this specialisation breaks (empty when it fits)."""
        out = []
        if self.regs > REG_LIMIT:
            out.append(f"{self.regs} registers > {REG_LIMIT}")
        if self.regs * self.num_warps * 32 > REGFILE:
            out.append(f"{self.regs} registers × {self.num_warps * 32} threads > {REGFILE} (launch would fail)")
        if self.smem > SMEM_LIMIT:
            out.append(f"{self.smem} B shared memory > {SMEM_LIMIT} B")
        return out


def format_table(records: List[KernelResources]) -> str:
    """Fixed-width table: kernel, variants, config, warps, registers, spill bytes, stack, shared memory."""
    head = ("kernel", "variant", "config", "warps", "regs", "spill st/ld", "stack", "smem")
    rows = [head] + [
        (r.kernel, ",".join(r.variants), r.config, str(r.num_warps), str(r.regs),
         f"{r.spill_stores}/{r.spill_loads}", str(r.stack), str(r.smem))
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ptxas


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


@functools.lru_cache(maxsize=None)
def _triton_passes_reg_alloc_level() -> bool:
    """Whether Triton's ptxas call adds --regAllocOptLevel=2 (triton >= 3.7, a ptxas 13 workaround)."""
    from triton.backends.nvidia.compiler import CUDABackend

    try:
        return "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin)
    except (OSError, TypeError):
        return False


def _ptxas_flags(metadata) -> List[str]:
    """The options Triton's own ptxas call uses for this kernel (see CUDABackend.make_cubin)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    flags = ["-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(ARCH)}"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if _triton_passes_reg_alloc_level():  # it moves register counts: mirror it exactly
        flags.append("--regAllocOptLevel=2")
    if getattr(metadata, "ptx_options", None):
        flags += metadata.ptx_options.split()
    return flags


def parse_ptxas_log(log: str) -> Optional[Dict[str, int]]:
    """{regs, spill_stores, spill_loads, stack, smem} from ``ptxas -v`` output of one kernel, None if absent."""
    used, spill = _USED.search(log), _SPILL.search(log)
    if used is None or spill is None:
        return None
    smem = _SMEM.search(log)
    return dict(regs=int(used.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), smem=int(smem.group(1)) if smem else 0)


def ptxas_resources(ptx: str, metadata) -> Dict[str, int]:
    """Rerun ptxas -v on ``ptx`` (one kernel) with Triton's options and parse it; raises on a ptxas error."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(), *_ptxas_flags(metadata), src, "-o", os.path.join(tmp, "kernel.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed ({done.returncode}) on {metadata.name}:\n{log[-2000:]}")
    res = parse_ptxas_log(log)
    if res is None:
        raise RuntimeError(f"cannot read ptxas -v output for {metadata.name}:\n{log[-2000:]}")
    return res


_RES_REG = re.compile(r"REG:(\d+)")


def cubin_registers(cubin: bytes) -> Optional[int]:
    """Registers of the kernel in Triton's cubin (``cuobjdump -res-usage``), None if the tool is missing.

    Cross-checks :func:`ptxas_resources`: its rerun must mirror Triton's ptxas options to
    report the binary Triton actually built.
    """
    tool = os.path.join(os.path.dirname(ptxas_path()), "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    found = _RES_REG.search(done.stdout)
    return int(found.group(1)) if done.returncode == 0 and found else None


# ----------------------------------------------------------------------------- the stand-in driver


def _make_driver():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class _Sm90Driver(DriverBase):
        """Reports an sm_90 target and dummy device/stream; cannot load or launch anything."""

        utils = None  # Triton reaches driver.utils only to load a binary, which never happens here

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise NotImplementedError("the sm_90 compile check never runs kernels")

    return _Sm90Driver()


def _config(kwargs) -> str:
    """Short text of the launcher's constexpr/option keywords (tl dtypes by name, bools as 0/1, no floats)."""
    parts = []
    for name, value in kwargs.items():
        if name == "num_warps" or isinstance(value, float):
            continue
        if isinstance(value, bool):
            value = int(value)
        elif hasattr(value, "primitive_bitwidth") or type(value).__module__.startswith("triton"):
            value = str(value)
        parts.append(f"{name}={value}")
    return " ".join(parts)


class _Session:
    """What one ``sm90_compile_only`` block compiled; ``variant`` labels the launcher calls."""

    def __init__(self):
        self.variant = "?"
        self.records: Dict[str, KernelResources] = {}  # by compiled hash: one binary, one row

    @contextlib.contextmanager
    def label(self, variant: str) -> Iterator[None]:
        prev, self.variant = self.variant, variant
        try:
            yield
        finally:
            self.variant = prev

    def add(self, fn, compiled, kwargs, ptxas_log=""):
        rec = self.records.get(compiled.hash)
        if rec is None:
            meta = compiled.metadata
            # Triton's own ptxas -v log when it just built the kernel; a rerun when the kernel
            # came from Triton's on-disk cache (no log then).
            res = parse_ptxas_log(ptxas_log) or ptxas_resources(compiled.asm["ptx"], meta)
            rec = KernelResources(kernel=fn.__name__, config=_config(kwargs), variants=[], num_warps=meta.num_warps,
                                  regs=res["regs"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                                  stack=res["stack"], smem=meta.shared + res["smem"],
                                  cubin_regs=cubin_registers(compiled.asm["cubin"]))
            self.records[compiled.hash] = rec
        if self.variant not in rec.variants:
            rec.variants.append(self.variant)

    def results(self) -> List[KernelResources]:
        return sorted(self.records.values(), key=lambda r: (r.kernel, r.variants[0], r.config))


@contextlib.contextmanager
def sm90_compile_only() -> Iterator[_Session]:
    """Inside the block, launching a ``@triton.jit`` kernel compiles it for sm_90 and records it instead of running it.

    Restores on exit, even on error: the previously active driver (possibly none yet), the
    original ``JITFunction.run``, and each touched kernel's own compile cache.
    """
    from triton import knobs
    from triton.runtime import driver as driver_config
    from triton.runtime.jit import JITFunction

    session = _Session()
    original_run = JITFunction.run
    saved_caches = {}  # id(JITFunction) -> (the function, its device_caches before the block)
    prev_active = driver_config._active  # None until something first asked for a driver

    def compile_only_run(fn, *args, grid, warmup, **kwargs):
        if id(fn) not in saved_caches:
            saved_caches[id(fn)] = (fn, fn.device_caches)
            fn.device_caches = defaultdict(fn.create_binder)
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log (saves a rerun)
            compiled = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
        session.add(fn, compiled, kwargs, log.getvalue())
        return None

    driver_config.set_active(_make_driver())
    JITFunction.run = compile_only_run
    try:
        yield session
    finally:
        JITFunction.run = original_run
        for fn, caches in saved_caches.values():
            fn.device_caches = caches
        driver_config._active = prev_active
