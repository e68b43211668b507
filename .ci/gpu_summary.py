"""One screen out of a GPU check's output folder: ``python .ci/gpu_summary.py OUT [--stages ...]``.

Reads what ``bash .ci/gpu`` leaves in OUT and writes ``OUT/summary.txt`` (also printed):

* ``junit.xml`` (pytest): per family (test file) and backend, passed / failed / skipped
  / not run, and the worst error against the reference (the ``max_rel_err`` property
  that ``.ci/gpu_pytest_plugin.py`` records: max |actual − expected| / max |expected|);
  then the first failures with their message. Tests the run never reached (cut by its
  time budget) count as "not run", from the collected count in ``tests.log``.
* ``results.jsonl`` (``python -m benchmarks``): per case, each provider's median time
  and naive PyTorch's time divided by it (> 1: faster than naive), peak memory.
* ``--stages name=seconds:exit,...``: how long each stage took and how it ended.
* ``build.log``: whether the prebuilt extension was used or sslops was compiled here.

How to read it: README, "The one-command GPU check".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

BACKENDS = ("triton", "cuda", "cpu", "reference")
DTYPES = {"float16": "fp16", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
          "float32": "fp32", "fp32": "fp32", "float64": "fp64", "fp64": "fp64", "double": "fp64"}
MAX_FAILURES = 12
WIDTH = 100


def family_of(nodeid: str) -> str:
    """``tests/test_vicreg.py::test_x[...]`` -> ``vicreg``."""
    path = nodeid.split("::")[0]
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem[len("test_"):] if stem.startswith("test_") else stem


def _tokens(nodeid: str):
    name = nodeid.split("::")[-1]
    params = name[name.index("[") + 1:-1] if "[" in name else ""
    return name.split("[")[0], [t.lower() for t in re.split(r"[-_\s,]+", params) if t]


def backend_param_of(nodeid: str):
    """The backend a test is parametrized with (a parameter id named like one), else None."""
    _, params = _tokens(nodeid)
    return next((token for token in params if token in BACKENDS), None)


def backend_of(nodeid: str) -> str:
    """The backend a test exercises: a parameter named like one, else the test's name, else ``-``."""
    name, _ = _tokens(nodeid)
    param = backend_param_of(nodeid)
    if param:
        return param
    words = name.lower().split("_")
    for backend in BACKENDS:
        if backend in words:
            return backend
    return "-"


def dtype_of(nodeid: str):
    _, params = _tokens(nodeid)
    for token in params:
        if token.replace("torch.", "") in DTYPES:
            return DTYPES[token.replace("torch.", "")]
    return None


# ----------------------------------------------------------------------------- tests

def read_junit(path):
    """[{nodeid, outcome, message, max_rel_err}] from a pytest JUnit XML file ([] when missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    cases = []
    for tc in root.iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        file = tc.get("file")
        parts = classname.split(".")
        # pytest writes classname "tests.test_vicreg" (or "tests.test_vicreg.TestClass")
        module = next((i for i in range(len(parts), 0, -1) if parts[i - 1].startswith("test_")), len(parts))
        path = file or "/".join(parts[:module]) + ".py"
        nodeid = "::".join([path] + parts[module:] + [name])
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or (el.text or "")).strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        props = {}
        for prop in tc.iter("property"):
            if prop.get("name") in ("max_rel_err", "rule_ratio"):
                try:
                    props[prop.get("name")] = float(prop.get("value"))
                except (TypeError, ValueError):
                    pass
        cases.append({"nodeid": nodeid, "outcome": outcome, "message": message,
                      "max_rel_err": props.get("max_rel_err"), "rule_ratio": props.get("rule_ratio")})
    return cases


def collected_count(log_path):
    """How many tests the run selected, from pytest's log (xdist's '[N items]' or 'collected N items')."""
    try:
        text = open(log_path, errors="replace").read()
    except OSError:
        return None
    found = re.findall(r"\[(\d+) items?\]", text)
    if found:
        return int(found[-1])
    match = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
    if match:
        return int(match.group(3) or int(match.group(1)) - int(match.group(2) or 0))
    return None


def test_table(cases, collected):
    groups = collections.OrderedDict()
    for case in sorted(cases, key=lambda c: (family_of(c["nodeid"]), backend_of(c["nodeid"]))):
        key = (family_of(case["nodeid"]), backend_of(case["nodeid"]))
        g = groups.setdefault(key, {"passed": 0, "failed": 0, "skipped": 0, "err": None, "err_dtype": None, "ratio": None})
        g["failed" if case["outcome"] in ("failed", "error") else case["outcome"]] += 1
        err, ratio = case["max_rel_err"], case.get("rule_ratio")
        if err is not None and (g["err"] is None or err > g["err"]):
            g["err"], g["err_dtype"] = err, dtype_of(case["nodeid"])
        if ratio is not None and (g["ratio"] is None or ratio > g["ratio"]):
            g["ratio"] = ratio
    totals = collections.Counter("failed" if c["outcome"] == "error" else c["outcome"] for c in cases)
    lines = []
    not_run = None if collected is None else max(0, collected - len(cases))
    head = (f"tests: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
            + (f", {not_run} not run (of {collected} selected)" if not_run is not None else ", selected count unknown"))
    lines.append(head)
    if not cases:
        lines.append("  no test results (junit.xml missing or empty: see tests.log)")
        return lines
    lines.append(f"  {'family':<18} {'backend':<10} {'passed':>6} {'failed':>6} {'skipped':>7}   worst error vs reference"
                 " [worst kernel error / 2x-rule bound]")
    for (family, backend), g in groups.items():
        err = "-" if g["err"] is None else f"{g['err']:.1e}" + (f" ({g['err_dtype']})" if g["err_dtype"] else "")
        if g["ratio"] is not None:
            err += f" [{g['ratio']:.2f}]"
        lines.append(f"  {family:<18} {backend:<10} {g['passed']:>6} {g['failed']:>6} {g['skipped']:>7}   {err}")
    failures = [c for c in cases if c["outcome"] in ("failed", "error")]
    if failures:
        lines.append(f"  first failures ({min(len(failures), MAX_FAILURES)} of {len(failures)}; all in tests.log and junit.xml):")
        for c in failures[:MAX_FAILURES]:
            lines.append(_clip(f"    {c['nodeid']}: {c['message']}"))
    return lines


# ----------------------------------------------------------------------------- benchmarks

def read_results(path):
    rows = []
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
    except OSError:
        pass
    return rows


def _case_title(row):
    shape = " ".join(f"{k}={v}" for k, v in (row.get("shape") or {}).items())
    return f"{row.get('loss')} {shape} {row.get('dtype')}"


def bench_table(rows):
    if not rows:
        return ["benchmarks: no rows (results.jsonl missing or empty: see bench.log)"]
    cases = collections.OrderedDict()
    for row in rows:
        providers = cases.setdefault(_case_title(row), collections.OrderedDict())
        name = row.get("provider")
        # a case measured twice (headline pass, compile pass): keep the measured row
        if name not in providers or providers[name].get("status") != "ok":
            providers[name] = row
    lines = ["benchmarks: median ms of forward+backward (naive / provider: > 1 is faster than naive), peak MB above inputs"]
    for title, providers in cases.items():
        naive = providers.get("naive")
        naive_ms = naive.get("median_ms") if naive and naive.get("status") == "ok" else None
        parts = []
        for name, row in providers.items():
            status = row.get("status")
            short = name.replace("sslops-", "")
            if status == "ok" and row.get("median_ms") is not None:
                text = f"{short} {row['median_ms']:.3g}"
                if naive_ms and name != "naive":
                    text += f" ({naive_ms / row['median_ms']:.2f}x)"
                if row.get("peak_mb") is not None:
                    text += f" {row['peak_mb']:.0f}MB"
            elif status == "skipped":
                continue
            else:
                text = f"{short} FAILED" + (" (OOM)" if "out of memory" in str(row.get("error", "")).lower() else "")
            parts.append(text)
        lines.append(_clip(f"  {title}: " + "; ".join(parts)))
    return lines


# ----------------------------------------------------------------------------- the page

def _clip(text, width=WIDTH * 2):
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_stages(text):
    """'install=31:0,tests=240:1' -> [(name, seconds, exit)]."""
    out = []
    for item in filter(None, (text or "").split(",")):
        name, _, rest = item.partition("=")
        seconds, _, code = rest.partition(":")
        out.append((name, int(seconds or 0), code or "?"))
    return out


def build_line(log_path):
    try:
        text = open(log_path, errors="replace").read()
    except OSError:
        return "build: no build.log"
    done = re.search(r"\[install\] sslops \S+ from ", text) is not None  # .ci/install's last line
    for pattern in (r"\[install\] using the prebuilt extension[^\n]*", r"\[install\] sslops already built[^\n]*",
                    r"\[install\] built in \d+ s", r"\[install\] not using [^\n]*"):
        match = re.search(pattern, text)
        if match:
            return "build: " + match.group(0).replace("[install] ", "") + ("" if done else " -- but the install did not finish (see build.log)")
    return "build: " + ("done (see build.log)" if done else "FAILED or cut short (see build.log)")


def summary(out_dir, stages=""):
    lines = ["sslops GPU check: " + out_dir]
    env_rows = read_results(os.path.join(out_dir, "results.jsonl"))
    if env_rows:
        r = env_rows[0]
        lines.append(f"device {r.get('device')} | torch {r.get('torch')} | triton {r.get('triton')} | CUDA {r.get('cuda')} | "
                     f"commit {str(r.get('commit'))[:10]}")
    st = parse_stages(stages)
    if st:
        lines.append("stages: " + ", ".join(f"{n} {s} s (exit {c})" for n, s, c in st) + f"; total {sum(s for _, s, _ in st)} s")
    lines.append(build_line(os.path.join(out_dir, "build.log")))
    lines.append("")
    lines += test_table(read_junit(os.path.join(out_dir, "junit.xml")), collected_count(os.path.join(out_dir, "tests.log")))
    lines.append("")
    lines += bench_table(env_rows)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--stages", default="", help="name=seconds:exit,... in run order")
    args = p.parse_args(argv)
    text = summary(args.out_dir, args.stages)
    with open(os.path.join(args.out_dir, "summary.txt"), "w") as fh:
        fh.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
