"""The benchmark harness: what a case is, how a provider is measured, where results go.

A :class:`Case` is one loss at one shape and dtype. Each ``benchmarks/bench_<stem>.py``
defines ``LOSSES`` (the loss names it covers) and ``cases(device, full) -> list[Case]``.
For every case the harness runs these *providers*, each as forward + backward
(``loss.backward()`` with respect to every floating-point input, or to the case's
``grad_inputs``; forward only for a case with ``backward=False``, such as the diagnostics of
``bench_metrics``):

* ``sslops-<backend>`` for every backend in ``sslops.kernel_backends(loss, device)``
  (the Triton interpreter is a test tool, not a provider: ``triton`` is skipped on CPU);
* ``naive``: the ``sslops.reference`` function called in the input dtype (what a user
  writing the loss in plain PyTorch gets);
* ``compile``: ``torch.compile`` of that same naive function (skipped, with the reason,
  when compiling fails or the run's compile-time budget is spent);
* the case's ``extra`` providers (e.g. Matrix-SSL's released-code route).

Time (milliseconds per forward + backward, median with p20 and p80):

* CUDA: ``triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=inputs)``;
* CPU: ``torch.utils.benchmark.Timer(...).timeit(number)`` over blocks of about 20 ms,
  the providers of a case taking their blocks in turn, round after round (on a shared
  machine a burst of load then hits all of them alike instead of whichever ran during
  it), until each has at least 3 blocks and ``min_run_time`` seconds; a provider whose
  first call took over 1 s gets three single calls, over 5 s two. Quantiles over blocks.

Peak memory above the inputs (MB = 1e6 bytes; includes the gradients, which stay alive):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` just before the call (the inputs, their gradients set to None);
* CPU: the torch profiler with ``profile_memory=True``; its allocation events
  (``alloc_size`` > 0 for an allocation, < 0 for a free) are put in time order and the
  peak of their running sum is the peak of bytes allocated during the call.

PyTorch's allocator only sees its own tensors: scratch a C++ kernel takes with ``malloc``
or ``std::vector`` is invisible to the number above, so on the CPU the row also carries
``peak_rss_mb``, the growth of the process's peak resident memory (VmHWM, reset through
``/proc/self/clear_refs``) while the timing calls run: a cross-check, not a replacement
(memory the C library recycles is invisible to it).

Each measured (case, provider) becomes one JSON line appended to the results file
(default ``benchmarks/results/results.jsonl``) with the date, git commit, device,
library versions and the numbers; ``python -m benchmarks.report`` and
``python -m benchmarks.plot`` read it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence

import torch

import sslops

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_FILE = os.path.join(RESULTS_DIR, "results.jsonl")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

CPU_MEMORY_METHOD = "torch.profiler(profile_memory=True): peak of the running sum of allocation events during one forward+backward"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before the call"
CPU_TIME_METHOD = "torch.utils.benchmark.Timer.timeit over ~20 ms blocks, providers interleaved round by round (quantiles over blocks)"
CUDA_TIME_METHOD = "triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])"


# ----------------------------------------------------------------------------- the case


@dataclasses.dataclass
class Case:
    """One loss at one shape and dtype.

    Attributes:
        loss: the sslops backend-registry name (``"vicreg"``, ``"barlow_twins"``,
            ``"info_nce"``, ``"matrix_ssl"``, ``"vicreg_relation"``): decides which
            ``sslops-<backend>`` providers run.
        shape: the sizes, e.g. ``{"N": 2048, "K": 8192}`` (plots use ``N`` and ``K``).
        dtype: the input dtype.
        make_inputs: ``make_inputs(device) -> tuple`` of the call's positional inputs
            (floating tensors get ``requires_grad``; others, e.g. labels, are passed as is).
        sslops_fn: ``sslops_fn(*inputs, backend=name) -> loss``.
        naive_fn: ``naive_fn(*inputs) -> loss``: the ``sslops.reference`` math in the
            input dtype; also what ``compile`` compiles.
        extra: more providers, ``{name: fn(*inputs) -> loss}``.
        flops: FLOPs of forward + backward along the route sslops takes (for the
            lower bound ``flops / device peak``); None when not given.
        note: free text stored with every row of this case.
        name: the name shown and stored (defaults to ``loss``; e.g. ``"nt_xent"``).
        compile: whether to try the ``compile`` provider for this case.
        skip_backends: ``{backend: reason}``: sslops backends not run for this case,
            recorded as skipped with the reason (e.g. a kernel known to be far too slow
            at this size to be worth the device time).
        grad_inputs: positions of the inputs that require grad (the backward differentiates
            those only, as in training where e.g. a teacher's output is detached); None:
            every floating input.
        skip_providers: ``{provider: reason}``: the same for ``naive``, ``compile`` or an
            ``extra`` provider (e.g. a naive route that would not fit in memory).
        backward: False for a forward-only case (a diagnostic, not a loss): the inputs
            get no ``requires_grad`` and the providers are timed without ``backward()``.
    """

    loss: str
    shape: Dict[str, int]
    dtype: torch.dtype
    make_inputs: Callable
    sslops_fn: Callable
    naive_fn: Callable
    extra: Dict[str, Callable] = dataclasses.field(default_factory=dict)
    flops: Optional[float] = None
    note: str = ""
    name: str = ""
    compile: bool = True
    skip_backends: Dict[str, str] = dataclasses.field(default_factory=dict)
    grad_inputs: Optional[Sequence[int]] = None
    skip_providers: Dict[str, str] = dataclasses.field(default_factory=dict)
    backward: bool = True

    def __post_init__(self):
        if not self.name:
            self.name = self.loss

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def title(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.name} {dims} {self.dtype_name}"


def randn_inputs(*shapes, dtype, seed=0, scale=1.0):
    """A ``make_inputs`` helper: independent normal tensors of the given shapes, made on the device."""

    def make(device):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return tuple((torch.randn(*s, generator=g, dtype=torch.float32) * scale).to(device=device, dtype=dtype) for s in shapes)

    return make


# ----------------------------------------------------------------------------- environment


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=None)
def _static_env():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = None
    if commit != "unknown":
        dirty = _git("status", "--porcelain", "--untracked-files=no") not in ("", None)
    return {
        "commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "sslops": sslops.__version__,
    }


def environment(device: torch.device) -> dict:
    """What every results row carries about where and with what it ran."""
    env = dict(_static_env())
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["device"] = device_name(device)
    env["device_type"] = device.type
    env["threads"] = torch.get_num_threads()
    env["cpu_count"] = os.cpu_count()
    try:  # other work on the machine: on a shared CPU it dominates the noise
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        env["loadavg_1m"] = None
    return env


# ----------------------------------------------------------------------------- memory


def _allocation_events(prof, device_type):
    """(time_ns, bytes) of every allocation (+) and free (-) the profiler saw on ``device_type``."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == device_type:
                events.append((node.start_time_ns, int(fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Send file descriptor 2 to /dev/null for the duration (C++ log lines included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes_cpu(fn) -> int:
    """Peak bytes allocated on the CPU while ``fn()`` runs, above what was allocated before.

    Walks the profiler's allocation/free events in time order. Memory freed inside ``fn``
    but allocated before it would pull the running sum below zero, so callers release
    such memory (e.g. old gradients) before calling.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():  # kineto prints "profiler_start/stop" lines straight to fd 2
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    live = peak = 0
    for _, size in _allocation_events(prof, "cpu"):
        live += size
        peak = max(peak, live)
    return peak


def _malloc_trim():
    """Give the C library's free heap memory back to the OS (glibc), so RSS starts low."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Growth of the process's peak resident set (VmHWM) over its resident set at entry.

    A cross-check of the profiler's number on the CPU: it also sees memory that does not
    come from PyTorch's allocator (``malloc``/``std::vector`` scratch inside C++ kernels,
    OpenMP buffers). The C library's free heap is trimmed first (``malloc_trim``), but
    memory it keeps and hands out again can still hide, so it can read low as well as high. Needs Linux with a writable
    ``/proc/self/clear_refs`` (``growth`` stays None otherwise).
    """

    growth = None

    @staticmethod
    def _status_kb(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def __enter__(self):
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current VmRSS
            self._base = self._status_kb("VmRSS")
        except (OSError, KeyError, ValueError):
            self._base = None
        return self

    def __exit__(self, *exc):
        if self._base is not None:
            try:
                self.growth = max(0, self._status_kb("VmHWM") - self._base) * 1024
            except (OSError, KeyError, ValueError):
                self.growth = None
        return False


def peak_bytes_cuda(fn, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ----------------------------------------------------------------------------- time


def _quantiles(values, qs=(0.5, 0.2, 0.8)):
    t = torch.tensor(sorted(values), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in qs]


def time_cuda(step, grad_to_none):
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return [float(med), float(p20), float(p80)], None


# ----------------------------------------------------------------------------- FLOP ceilings

# Dense tensor-core peaks (FLOP/s) of GPUs we know; fp32 uses the TF32 peak (an optimistic,
# hence true, lower bound on time). Matched by substring of the device name, first hit wins.
_GPU_PEAKS = [
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "fp64": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "fp16": 756.0e12, "fp32": 378.0e12, "fp64": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12, "fp64": 66.9e12}),
    ("A100", {"bf16": 312.0e12, "fp16": 312.0e12, "fp32": 156.0e12, "fp64": 19.5e12}),
]


def device_peak_flops(device_type: str, name: str, dtype_name: str):
    """(FLOP/s, how it was obtained) for the device in this dtype.

    ``SSLOPS_BENCH_PEAK_TFLOPS`` (``--peak-tflops``) overrides everything; see
    :func:`_device_peak_flops` for the rest.
    """
    override = os.environ.get("SSLOPS_BENCH_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12, f"--peak-tflops {override}"
    return _device_peak_flops(device_type, name, dtype_name)


@functools.lru_cache(maxsize=None)
def _device_peak_flops(device_type: str, name: str, dtype_name: str):
    """(FLOP/s, how it was obtained) for the device in this dtype.

    Known GPUs: the datasheet dense peak. Anything else (the CPU included): the best rate
    of a square matmul measured here, a practical ceiling rather than a theoretical one
    (on a loaded machine it underestimates the peak, so "% of bound" can pass 100). On the
    CPU half-precision inputs use the fp32 rate: CPU kernels accumulate in fp32, and a
    CPU without native bf16/fp16 matmul would otherwise give a meaninglessly low ceiling.
    """
    for key, peaks in _GPU_PEAKS:
        if device_type == "cuda" and key in name and dtype_name in peaks:
            return peaks[dtype_name], f"{key} datasheet dense peak ({dtype_name}{', TF32' if dtype_name == 'fp32' else ''})"
    if device_type == "cpu" and dtype_name in ("bf16", "fp16"):
        dtype_name = "fp32"
    dtype = DTYPES[dtype_name]
    best_rate = 0.0
    for size in ((4096, 8192) if device_type == "cuda" else (1024, 2048)):
        a = torch.randn(size, size, device=device_type).to(dtype)
        b = torch.randn(size, size, device=device_type).to(dtype)
        for _ in range(6):
            if device_type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device_type == "cuda":
                torch.cuda.synchronize()
            best_rate = max(best_rate, 2 * size**3 / (time.perf_counter() - t0))
    return best_rate, f"best measured {dtype_name} matmul rate (square, 2 sizes)"


# ----------------------------------------------------------------------------- providers


COMPILE = object()  # placeholder provider: torch.compile of case.naive_fn, built when it runs


class CompileBudget:
    """Wall-clock seconds the run may spend compiling; once spent, ``compile`` is skipped."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.spent = 0.0

    def exhausted(self) -> bool:
        return self.spent >= self.seconds


def providers(case: Case, device: torch.device, with_compile: bool = True):
    """[(name, fn or None, why-skipped)] in run order: naive first, then sslops, compile, extras."""
    out = [("naive", case.naive_fn, None)]
    for backend in sslops.kernel_backends(case.loss, device):
        if backend == "triton" and device.type != "cuda":
            continue  # the Triton interpreter is for tests, not a benchmark provider
        if backend in case.skip_backends:
            out.append((f"sslops-{backend}", None, case.skip_backends[backend]))
            continue
        out.append((f"sslops-{backend}", functools.partial(case.sslops_fn, backend=backend), None))
    if with_compile and case.compile:
        out.append(("compile", COMPILE, None))
    elif with_compile:
        out.append(("compile", None, "torch.compile skipped for this case (compiling costs about 30 s per case on a CPU, and naive seconds per call: only the smaller CPU sizes compile)"))
    for name, fn in case.extra.items():
        out.append((name, fn, None))
    return [(name, None, case.skip_providers[name]) if name in case.skip_providers else (name, fn, why)
            for name, fn, why in out]


def _prepare(case: Case, device: torch.device):
    inputs = case.make_inputs(device)
    prepared = []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and case.backward:
            t = t.detach().requires_grad_(case.grad_inputs is None or i in case.grad_inputs)
        prepared.append(t)
    leaves = [t for t in prepared if isinstance(t, torch.Tensor) and t.requires_grad]
    return prepared, leaves


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:400]


def _make_step(fn, inputs, leaves):
    def step():
        for t in leaves:
            t.grad = None
        loss = fn(*inputs)
        if leaves:  # forward-only cases (Case.backward False) have no leaves
            loss.backward()
        return loss

    return step


def _clear(leaves):
    for t in leaves:
        t.grad = None
    gc.collect()


def prepare_provider(fn, inputs, leaves, device, *, warmup=True):
    """Warm-up (always on CUDA; on the CPU when ``warmup``, i.e. for compiled providers, the
    profiled memory call serving as warm-up otherwise), then the memory call.

    Returns ``(step, first_call_s, {"peak_mb", "loss_value"})``.
    """
    step = _make_step(fn, inputs, leaves)
    value = None
    if warmup or device.type == "cuda":
        loss = step()  # warm-up (and compilation for compiled providers)
        value = float(loss.detach().float().cpu())
        del loss
        _clear(leaves)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = peak_bytes_cuda(step, device)
    else:
        box = []
        peak = peak_bytes_cpu(lambda: box.append(float(step().detach().float())))
        value = box[0] if value is None else value
    first_call_s = time.perf_counter() - t0
    _clear(leaves)
    return step, first_call_s, {"peak_mb": peak / 1e6, "loss_value": value}


def time_cpu_interleaved(steps, first_call_s, *, min_run_time=0.5, slow_call_s=5.0, max_samples=200):
    """Time several providers on the CPU in rounds, one block of calls each per round.

    On a shared machine the load comes in bursts; taking the providers' samples in turn
    spreads each burst over all of them instead of penalising whichever ran during it, so
    the ratios stay fair. Each sample is ``Timer.timeit(number)`` (torch.utils.benchmark)
    over a block of ``number`` calls lasting about 20 ms, divided by ``number``. A provider
    is done after at least 3 samples and ``min_run_time`` seconds; one whose first call
    took over 1 s after 3 single calls, over ``slow_call_s`` after 2.

    Returns, per provider, ``(samples in seconds per call, peak RSS growth or None)`` or the
    exception it raised.
    """
    from torch.utils import benchmark

    n = len(steps)
    timers = [benchmark.Timer(stmt="step()", globals={"step": s}, num_threads=torch.get_num_threads()) for s in steps]
    number = [1 if t > 0.02 else max(1, int(0.02 / max(t, 1e-6))) for t in first_call_s]
    quota = [2 if t > slow_call_s else 3 if t > 1.0 else None for t in first_call_s]
    samples = [[] for _ in range(n)]
    spent = [0.0] * n
    rss = [None] * n
    failed = [None] * n

    def done(i):
        if failed[i] is not None:
            return True
        if quota[i] is not None:
            return len(samples[i]) >= quota[i]
        return len(samples[i]) >= max_samples or (len(samples[i]) >= 3 and spent[i] >= min_run_time)

    while True:
        active = [i for i in range(n) if not done(i)]
        if not active:
            break
        for i in active:
            try:
                if not samples[i]:
                    with RssPeak() as peak:
                        m = timers[i].timeit(number[i])
                    rss[i] = peak.growth
                else:
                    m = timers[i].timeit(number[i])
            except Exception as exc:  # noqa: BLE001 - recorded by the caller
                failed[i] = exc
                continue
            per_call = m.times[0]
            samples[i].append(per_call)
            spent[i] += per_call * number[i]
    return [failed[i] if failed[i] is not None else (samples[i], rss[i]) for i in range(n)]


def measure(fn, inputs, leaves, device, *, min_run_time=0.5, warmup=True, slow_call_s=5.0):
    """Time and peak memory of forward + backward of ``fn(*inputs)`` for one provider alone."""
    step, first_call_s, out = prepare_provider(fn, inputs, leaves, device, warmup=warmup)
    if device.type == "cuda":
        (med, p20, p80), samples = time_cuda(step, leaves)
        out.update(median_ms=med, p20_ms=p20, p80_ms=p80, samples=samples, peak_rss_mb=None)
    else:
        result = time_cpu_interleaved([step], [first_call_s], min_run_time=min_run_time, slow_call_s=slow_call_s)[0]
        if isinstance(result, Exception):
            raise result
        _set_cpu_times(out, *result)
    _clear(leaves)
    return out


def _set_cpu_times(row, times, rss):
    med, p20, p80 = (1e3 * t for t in _quantiles(times))
    row.update(median_ms=med, p20_ms=p20, p80_ms=p80, samples=len(times),
               peak_rss_mb=None if rss is None else rss / 1e6)


def run_case(case: Case, device: torch.device, *, with_compile=True, compile_budget: Optional[CompileBudget] = None,
             min_run_time=0.5, on_provider=None, compile_options: Optional[dict] = None) -> List[dict]:
    """Measure every provider of ``case``; a provider that raises is recorded as failed.

    Each provider is warmed up and its memory measured in turn; then on CUDA each is timed
    with ``do_bench`` right away, on the CPU all of them together, interleaved
    (:func:`time_cpu_interleaved`). ``compile_options`` go to ``torch.compile`` (default:
    inductor, ``dynamic=False``); the compile budget is charged the warm-up and memory calls.
    """
    rows = []
    try:
        inputs, leaves = _prepare(case, device)
    except Exception as exc:  # e.g. OOM making the inputs
        for name, _, _ in providers(case, device, with_compile):
            rows.append({"provider": name, "status": "failed", "error": "making inputs: " + _short_error(exc)})
            if on_provider:
                on_provider(name)
        return rows
    pending = []  # CPU: (row, step, first_call_s, t_prepared) timed together at the end
    for name, fn, why in providers(case, device, with_compile):
        row = {"provider": name}
        t0 = time.perf_counter()
        try:
            if fn is None:
                row.update(status="skipped", error=why)
            elif fn is COMPILE and compile_budget is not None and compile_budget.exhausted():
                row.update(status="skipped",
                           error=f"compile-time budget ({compile_budget.seconds:.0f} s) spent earlier in this run")
            else:
                if fn is COMPILE:
                    torch._dynamo.reset()  # a fresh cache: no recompile limit, no stale graphs
                    fn = torch.compile(case.naive_fn, **(compile_options or {"dynamic": False}))
                    try:
                        step, first_call_s, out = prepare_provider(fn, inputs, leaves, device, warmup=True)
                    finally:
                        if compile_budget is not None:
                            compile_budget.spent += time.perf_counter() - t0
                else:
                    step, first_call_s, out = prepare_provider(fn, inputs, leaves, device, warmup=False)
                row.update(out)
                if device.type == "cuda":
                    (med, p20, p80), samples = time_cuda(step, leaves)
                    row.update(median_ms=med, p20_ms=p20, p80_ms=p80, samples=samples, peak_rss_mb=None, status="ok")
                    _clear(leaves)
                else:
                    pending.append((row, step, first_call_s))
        except Exception as exc:  # OOM, unsupported dtype, compile failure...: record and go on
            row.update(status="failed", error=_short_error(exc))
        if row.get("status") == "failed":
            # after the except block, so that the traceback's frames (and their tensors) are gone
            _clear(leaves)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        if on_provider and not (pending and pending[-1][0] is row):
            on_provider(name)  # providers still to be timed report when their timing is done
    if pending:
        t0 = time.perf_counter()
        results = time_cpu_interleaved([p[1] for p in pending], [p[2] for p in pending], min_run_time=min_run_time)
        for (row, _, _), result in zip(pending, results):
            if isinstance(result, Exception):
                row.update(status="failed", error="timing: " + _short_error(result))
            else:
                _set_cpu_times(row, *result)
                row["status"] = "ok"
        share = (time.perf_counter() - t0) / len(pending)
        for row, _, _ in pending:
            row["wall_s"] = round(row["wall_s"] + share, 3)
            if on_provider:
                on_provider(row["provider"])
        del results
        _clear(leaves)
    del inputs, leaves, pending
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _add_ratios(case, device, rows)
    return rows


def _add_ratios(case: Case, device, rows):
    naive = next((r for r in rows if r["provider"] == "naive" and r.get("status") == "ok"), None)
    bound_s = None
    if case.flops:
        peak, how = device_peak_flops(device.type, device_name(device), case.dtype_name)
        bound_s = case.flops / peak
    for r in rows:
        if r.get("status") != "ok":
            continue
        if naive is not None:
            if r.get("loss_value") is not None and naive.get("loss_value") is not None:
                scale = max(abs(naive["loss_value"]), 1e-12)
                r["rel_diff_vs_naive"] = abs(r["loss_value"] - naive["loss_value"]) / scale
            r["speedup_vs_naive"] = naive["median_ms"] / r["median_ms"] if r["median_ms"] > 0 else None
            r["memory_ratio_vs_naive"] = (naive["peak_mb"] / r["peak_mb"]) if r["peak_mb"] > 0 else None
        if bound_s is not None:
            r["bound_ms"] = bound_s * 1e3
            r["pct_of_bound"] = 100.0 * r["bound_ms"] / r["median_ms"] if r["median_ms"] > 0 else None
            r["bound_method"] = how


# ----------------------------------------------------------------------------- output


def result_rows(case: Case, device: torch.device, rows: Sequence[dict], run_id: str, note: str = "") -> List[dict]:
    """The JSON lines for one case: the environment, the case, and each provider's numbers."""
    env = environment(device)
    notes = "; ".join(n for n in (case.note, note) if n)
    out = []
    for r in rows:
        line = dict(env)
        line.update({
            "run_id": run_id,
            "loss": case.name,
            "kernel_loss": case.loss,
            "shape": dict(case.shape),
            "dtype": case.dtype_name,
            "provider": r["provider"],
            "status": r.get("status", "failed"),
            "median_ms": r.get("median_ms"),
            "p20_ms": r.get("p20_ms"),
            "p80_ms": r.get("p80_ms"),
            "samples": r.get("samples"),
            "peak_mb": r.get("peak_mb"),
            "peak_rss_mb": r.get("peak_rss_mb"),
            "speedup_vs_naive": r.get("speedup_vs_naive"),
            "memory_ratio_vs_naive": r.get("memory_ratio_vs_naive"),
            "flops": case.flops,
            "bound_ms": r.get("bound_ms"),
            "pct_of_bound": r.get("pct_of_bound"),
            "bound_method": r.get("bound_method"),
            "loss_value": r.get("loss_value"),
            "rel_diff_vs_naive": r.get("rel_diff_vs_naive"),
            "error": r.get("error"),
            "wall_s": r.get("wall_s"),
            "bytes_forward": r.get("bytes_forward"),
            "bytes_backward": r.get("bytes_backward"),
            "time_method": CUDA_TIME_METHOD if device.type == "cuda" else CPU_TIME_METHOD,
            "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
            "note": notes,
        })
        out.append(line)
    return out


def append_results(lines: Sequence[dict], path: str = RESULTS_FILE):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def fmt_num(x):
    """Three significant digits below 100, whole numbers above (no exponents)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_mb(x):
    """Megabytes with three significant digits below 100, whole numbers above."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mb(nbytes):
    return None if nbytes is None else nbytes / 1e6


def _load_text(device_type: str) -> str:
    """``load 3.2 / 2 CPUs`` (1-minute load average against the CPUs; ``""`` where unknown)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    text = f"load {load:.1f} / {os.cpu_count()} CPUs"
    return text if device_type == "cpu" else text + " (host)"


def format_table(case: Case, rows: Sequence[dict], device_type: str = "cpu") -> str:
    """A narrow plain-text table of one case's providers.

    The heading carries the case, the machine's load average and the case's FLOP bound;
    every longer text (the case's note, why a provider was skipped or failed) is a numbered
    footnote under the table, so no row is wider than its numbers.
    """
    notes: List[str] = []

    def footnote(text):
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    title = case.title + (f" {footnote(case.note)}" if case.note else "")
    heading = [title]
    load = _load_text(device_type)
    if load:
        heading.append(load)
    bound = next((r.get("bound_ms") for r in rows if r.get("bound_ms") is not None), None)
    if bound is not None:
        heading.append(f"FLOP bound {fmt_num(bound)} ms")
    has_bound = bound is not None
    has_rss = any(r.get("peak_rss_mb") is not None for r in rows)
    has_bytes = any(r.get("bytes_forward") is not None for r in rows)
    header = ["provider", "ms", "p20-p80", "peak MB"] + (["RSS MB"] if has_rss else [])
    header += ["sent MB fwd", "bwd"] if has_bytes else []
    header += ["speed-up", "mem x", "rel.diff"] + (["% bound"] if has_bound else []) + ["status"]
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        spread = "-" if r.get("p20_ms") is None else f"{fmt_num(r['p20_ms'])}-{fmt_num(r['p80_ms'])}"
        cells = [r["provider"], fmt_num(r.get("median_ms")), spread, fmt_mb(r.get("peak_mb"))]
        cells += [fmt_mb(r.get("peak_rss_mb"))] if has_rss else []
        cells += [fmt_mb(_mb(r.get("bytes_forward"))), fmt_mb(_mb(r.get("bytes_backward")))] if has_bytes else []
        cells += [_fmt(r.get("speedup_vs_naive"), ".2f"), _fmt(r.get("memory_ratio_vs_naive"), ".2f"),
                  _fmt(r.get("rel_diff_vs_naive"), ".0e")]
        cells += [_fmt(r.get("pct_of_bound"), ".0f")] if has_bound else []
        cells += ["ok" if ok else f"{r.get('status', 'failed')} {footnote(r.get('error') or 'no reason recorded')}"]
        body.append(cells)
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    lines = [" | ".join(heading)]
    lines.append("  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    lines += [f"  [{i + 1}] {text}" for i, text in enumerate(notes)]
    return "\n".join(lines)


LEGEND = ("columns: ms = forward+backward per call (median; p20-p80 the spread); peak MB = peak allocated "
          "above the inputs (gradients included); RSS MB (CPU) = growth of the process's peak resident memory "
          "while timing, a cross-check that also sees non-PyTorch allocations; speed-up = naive ms / provider ms "
          "and mem x = naive peak / provider peak (> 1 = better than naive PyTorch); rel.diff = |loss - naive "
          "loss| / |naive loss| (naive runs in the input dtype); % bound = the case's FLOP bound (its FLOPs at "
          "the device ceiling: datasheet peak for known GPUs, else the best measured matmul rate, or "
          "--peak-tflops) / median; sent MB fwd/bwd (distributed cases) = bytes one rank sends to the "
          "collectives per call (ring model); [n] = footnote under the table")


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def stderr(msg):
    print(msg, file=sys.stderr)
