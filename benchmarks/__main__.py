"""``python -m benchmarks``: every loss, every provider available here, one table per case.

    python -m benchmarks                       # quick sizes on CPU, the full sweep on CUDA
    python -m benchmarks --only vicreg,infonce --dtype bf16 --full
    python -m benchmarks --plot                # also draw time/memory against N and K
    python -m benchmarks.report                # markdown of the latest results per device

    python -m benchmarks --headline --budget 200   # the GPU check's cases (benchmarks/headline.py)

``--only`` takes bench-file stems (``vicreg``, ``barlow_twins``, ``infonce``, ``clip``, ``siglip``,
``mce``, ``metrics``) or loss names (``vicreg_relation``, ``info_nce``, ``matrix_ssl``, ``rankme``,
``alignment``, ...). Rows are appended to
``benchmarks/results/local.jsonl``, which git ignores (``--out`` for another file): the
committed ``benchmarks/results/results.jsonl`` changes only when results are curated on
purpose (``--out benchmarks/results/results.jsonl``, or appending chosen rows to it).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
import time

import torch

from . import common


STEM_ORDER = ["vicreg", "barlow_twins", "infonce", "clip", "siglip", "mce", "metrics"]
# A run's rows go here unless --out says otherwise: untracked (.gitignore), so benchmarking
# never modifies the curated, committed results.jsonl.
LOCAL_RESULTS_FILE = os.path.join(common.RESULTS_DIR, "local.jsonl")


def bench_modules():
    """{stem: module} for every benchmarks/bench_<stem>.py."""
    stems = [os.path.basename(p)[len("bench_"):-len(".py")] for p in glob.glob(os.path.join(common.HERE, "bench_*.py"))]
    stems.sort(key=lambda s: (STEM_ORDER.index(s) if s in STEM_ORDER else len(STEM_ORDER), s))
    return {stem: importlib.import_module(f"benchmarks.bench_{stem}") for stem in stems}


def select_cases(device, full, only=None, dtypes=None):
    """[(stem, case)] for the requested stems/losses and dtypes."""
    wanted = set(only or [])
    mods = bench_modules()
    unknown = wanted - set(mods) - {name for m in mods.values() for name in getattr(m, "LOSSES", [])}
    cases = []
    for stem, mod in mods.items():
        module_names = {stem, *getattr(mod, "LOSSES", [])}
        if wanted and not (wanted & module_names):
            continue
        for case in mod.cases(device, full):
            if wanted and stem not in wanted and case.name not in wanted and case.loss not in wanted:
                continue
            if dtypes and case.dtype_name not in dtypes:
                continue
            cases.append((stem, case))
    return cases, sorted(unknown)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated bench stems or loss names (default: all)")
    p.add_argument("--full", action="store_true", default=None, help="the full sweep (default on CUDA)")
    p.add_argument("--quick", dest="full", action="store_false", help="the quick sizes (default on CPU)")
    p.add_argument("--dtype", default="", help="comma-separated dtypes to keep: bf16,fp16,fp32,fp64 (default: all)")
    p.add_argument("--device", default=common.default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of compiling allowed per run before 'compile' is skipped (default 150 on CPU, 1200 on CUDA)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="CPU: timing seconds per provider (at least 3 blocks each)")
    p.add_argument("--out", default=LOCAL_RESULTS_FILE,
                   help="results file to append to (JSON lines; default benchmarks/results/local.jsonl, untracked)")
    p.add_argument("--no-save", action="store_true", help="print only, append nothing")
    p.add_argument("--note", default="", help="free text stored with every row (e.g. 'shared machine')")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device ceiling for the FLOP bound (default: datasheet for known GPUs, else the best measured matmul rate)")
    p.add_argument("--plot", action="store_true", help="draw time/memory against N and K after the run")
    p.add_argument("--headline", action="store_true",
                   help="the headline GPU cases of every family, then torch.compile for one case per family (benchmarks/headline.py)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: start no new case after this long (the cases not run are listed)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    dtypes = [s.strip() for s in args.dtype.split(",") if s.strip()]
    bad = [d for d in dtypes if d not in common.DTYPES]
    if bad:
        raise SystemExit(f"--dtype: unknown {bad}; expected some of {sorted(common.DTYPES)}")
    if args.peak_tflops is not None:
        os.environ["SSLOPS_BENCH_PEAK_TFLOPS"] = str(args.peak_tflops)
    if args.headline:
        from . import headline

        cases, unknown = headline.cases(device), []
    else:
        cases, unknown = select_cases(device, full, only, dtypes)
    if unknown:
        raise SystemExit(f"--only: unknown {unknown}; stems: {sorted(bench_modules())}")
    if args.list:
        for stem, case in cases:
            print(f"{stem:14s} {case.title}" + ("" if case.compile else "  (no compile)"))
        return 0
    if not cases:
        raise SystemExit("no case selected")

    budget_s = args.compile_budget if args.compile_budget is not None else (1200.0 if device.type == "cuda" else 150.0)
    budget = common.CompileBudget(budget_s)
    run_id = common.new_run_id()
    env = common.environment(device)
    header = (f"sslops benchmarks: {env['device']} | torch {env['torch']} triton {env['triton']} cuda {env['cuda']} | "
              f"commit {env['commit'][:10]}{' (dirty)' if env['git_dirty'] else ''} | {'full' if full else 'quick'} sweep, "
              f"{len(cases)} cases | run {run_id}")
    print(header)
    print("time:   " + (common.CUDA_TIME_METHOD if device.type == "cuda" else common.CPU_TIME_METHOD))
    print("memory: " + (common.CUDA_MEMORY_METHOD if device.type == "cuda" else common.CPU_MEMORY_METHOD))
    print(common.LEGEND)
    if args.note:
        print("note:   " + args.note)
    sys.stdout.flush()

    tqdm = _progress_bar()

    total = sum(len(common.providers(c, device, not args.no_compile)) for _, c in cases)
    failed = 0
    started = time.monotonic()
    not_run = []
    with tqdm(total=total, desc="benchmarks", unit="provider", dynamic_ncols=True, file=sys.stderr) as bar:
        modules = bench_modules()
        for stem, case in cases:
            if args.budget is not None and time.monotonic() - started > args.budget:
                not_run.append(case.title)
                continue
            bar.set_postfix_str(case.title)

            def advance(name):
                bar.update(1)

            if device.type == "cpu":
                bar.set_postfix_str(f"{case.title} (load {os.getloadavg()[0]:.1f})")
            run_case = getattr(modules[stem], "run_case", common.run_case)  # e.g. bench_distributed spawns ranks
            rows = run_case(case, device, with_compile=not args.no_compile, compile_budget=budget,
                            min_run_time=args.min_run_time, on_provider=advance)
            failed += sum(r.get("status") == "failed" for r in rows)
            tqdm.write("\n" + common.format_table(case, rows, device.type), file=sys.stdout)
            sys.stdout.flush()
            if not args.no_save:
                common.append_results(common.result_rows(case, device, rows, run_id, args.note), args.out)
    if not args.no_save:
        print(f"\nappended to {args.out} (run {run_id})")
    if failed:
        print(f"{failed} provider runs failed (recorded with their reason)")
    if not_run:
        print(f"time budget of {args.budget:.0f} s spent: {len(not_run)} cases not run: {'; '.join(not_run)}")
    if args.plot:
        from . import plot

        paths = plot.plot(args.out, run_id=None if args.no_save else run_id)
        for path in paths:
            print("plot:", path)
        if not paths:
            print(f"plot: no loss was measured at {plot.MIN_POINTS} or more sizes along N or K in this run (try --full)")
    return 0


class _PlainProgress:
    """The few tqdm calls used above, as plain lines on stderr (when tqdm is not installed)."""

    def __init__(self, total, **_):
        self.total, self.done = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.done += n

    def set_postfix_str(self, text):
        print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    @staticmethod
    def write(text, file=None):
        print(text, file=file or sys.stdout)


def _progress_bar():
    try:
        from tqdm import tqdm

        return tqdm
    except ImportError:
        return _PlainProgress


if __name__ == "__main__":
    sys.exit(main())
