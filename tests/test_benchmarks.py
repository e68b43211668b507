"""The benchmark harness: measurements, the CLI end to end, the results file, report and plot.

Tiny cases only (the real sweeps are run by hand: ``python -m benchmarks``).
"""

import json
import os
import types

import pytest
import torch

import sslops
from benchmarks import __main__ as bench_main
from benchmarks import common, report
from sslops import reference

REQUIRED_FIELDS = {
    "date", "commit", "git_dirty", "device", "device_type", "torch", "triton", "cuda", "python", "sslops",
    "threads", "cpu_count", "loadavg_1m", "run_id", "loss", "kernel_loss", "shape", "dtype", "provider", "status", "median_ms", "p20_ms",
    "p80_ms", "samples", "peak_mb", "peak_rss_mb", "speedup_vs_naive", "memory_ratio_vs_naive", "flops", "bound_ms",
    "pct_of_bound", "bound_method", "loss_value", "rel_diff_vs_naive", "error", "wall_s", "time_method", "memory_method", "note",
}


# ----------------------------------------------------------------------------- memory


def test_cpu_peak_memory_sees_a_known_allocation():
    a = torch.randn(1000, 1000)
    b = torch.randn(1000, 1000)
    peak = common.peak_bytes_cpu(lambda: a @ b)  # one 1000×1000 fp32 output: 4 MB
    assert 4_000_000 <= peak < 4_100_000


def test_cpu_peak_memory_tracks_frees_in_time_order():
    a = torch.randn(500, 500)  # 1 MB

    def two_live():
        c = a * 2
        d = c * 3  # c and d alive together: 2 MB
        return d.sum()

    def one_at_a_time():
        for _ in range(4):
            c = a * 2  # 1 MB allocated then freed, four times: the peak stays 1 MB
            del c

    assert 2_000_000 <= common.peak_bytes_cpu(two_live) < 2_100_000
    assert 1_000_000 <= common.peak_bytes_cpu(one_at_a_time) < 1_100_000


def test_rss_peak_sees_memory_outside_pytorch():
    with common.RssPeak() as rss:
        blob = b"\x01" * 50_000_000  # 50 MB written by Python, not by PyTorch's allocator
        del blob
    if rss.growth is None:
        pytest.skip("/proc/self/clear_refs is not writable here: the RSS cross-check is off")
    assert 45_000_000 <= rss.growth < 200_000_000


# ----------------------------------------------------------------------------- the harness


def _tiny_module():
    def boom(z_a, z_b):
        raise RuntimeError("deliberate failure")

    def cases(device, full):
        return [common.Case(
            loss="vicreg",
            shape={"N": 16, "K": 8},
            dtype=torch.float32,
            make_inputs=common.randn_inputs((16, 8), (16, 8), dtype=torch.float32),
            sslops_fn=lambda z_a, z_b, backend: sslops.vicreg_loss(z_a, z_b, backend=backend),
            naive_fn=reference.vicreg_loss,
            extra={"boom": boom},
            flops=8.0 * 16 * 8 * 8,
            note="tiny test case",
        )]

    return types.SimpleNamespace(LOSSES=["vicreg"], cases=cases)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench_main, "bench_modules", lambda: {"tiny": _tiny_module()})


def test_cli_runs_a_case_end_to_end(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.jsonl"
    monkeypatch.setenv("SSLOPS_BENCH_PEAK_TFLOPS", "0.001")  # main() sets it too; monkeypatch undoes it afterwards
    rc = bench_main.main(["--only", "tiny", "--device", "cpu", "--out", str(out), "--min-run-time", "0.02",
                          "--compile-budget", "0", "--note", "unit test", "--peak-tflops", "0.001"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "vicreg N=16 K=8 fp32" in printed and "naive" in printed and "speed-up" in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_provider = {line["provider"]: line for line in lines}
    expected = {"naive", "compile", "boom"} | {f"sslops-{b}" for b in sslops.kernel_backends("vicreg", "cpu") if b != "triton"}
    assert set(by_provider) == expected
    for line in lines:
        assert REQUIRED_FIELDS <= set(line), REQUIRED_FIELDS - set(line)
        assert line["shape"] == {"N": 16, "K": 8} and line["dtype"] == "fp32" and line["loss"] == "vicreg"
        assert "unit test" in line["note"] and "tiny test case" in line["note"]
        assert line["device_type"] == "cpu" and str(torch.get_num_threads()) in line["device"]
    naive = by_provider["naive"]
    assert naive["status"] == "ok"
    assert 0 < naive["p20_ms"] <= naive["median_ms"] <= naive["p80_ms"]
    assert naive["samples"] >= 3
    assert naive["peak_mb"] > 0  # at least the two 16×8 gradients
    assert naive["peak_rss_mb"] is None or naive["peak_rss_mb"] >= 0
    assert naive["speedup_vs_naive"] == pytest.approx(1.0) and naive["memory_ratio_vs_naive"] == pytest.approx(1.0)
    assert naive["bound_ms"] == pytest.approx(8.0 * 16 * 8 * 8 / 1e9 * 1e3)  # flops at 1 GFLOP/s
    assert naive["pct_of_bound"] == pytest.approx(100 * naive["bound_ms"] / naive["median_ms"])
    expected_loss = float(reference.vicreg_loss(*common.randn_inputs((16, 8), (16, 8), dtype=torch.float32)("cpu")))
    assert naive["loss_value"] == pytest.approx(expected_loss, rel=1e-5)
    # a provider that raises is recorded with its reason and the sweep goes on
    assert by_provider["boom"]["status"] == "failed" and "deliberate failure" in by_provider["boom"]["error"]
    # a spent compile budget skips compile with the reason
    assert by_provider["compile"]["status"] == "skipped" and "budget" in by_provider["compile"]["error"]
    for name in expected - {"naive", "compile", "boom"}:  # sslops-<backend>: their correctness is tested elsewhere
        row = by_provider[name]
        if row["status"] == "ok":
            assert row["loss_value"] == pytest.approx(expected_loss, rel=1e-4) and row["median_ms"] > 0
        else:
            assert row["status"] == "failed" and row["error"]

    # a second run appends, and the report shows the latest row per key
    bench_main.main(["--only", "tiny", "--device", "cpu", "--out", str(out), "--min-run-time", "0.02", "--no-compile"])
    rows = report.load(str(out))
    assert len(rows) == len(lines) + len(expected) - 1  # --no-compile: no compile row
    md = report.render(rows)
    assert "#### vicreg" in md and "| N | K | dtype | provider |" in md
    assert md.count("| 16 | 8 | fp32 | naive |") == 1
    assert "failed: RuntimeError: deliberate failure" in md
    assert "1 skipped provider runs not shown" in md  # the first run's compile row is still the latest for its key


def test_compile_provider_runs_and_spends_the_budget():
    # aot_eager keeps this fast; it goes through the same dynamo reset, warm-up and budget path as inductor
    case = _tiny_module().cases("cpu", False)[0]
    budget = common.CompileBudget(1000.0)
    rows = common.run_case(case, torch.device("cpu"), compile_budget=budget, min_run_time=0.02,
                           compile_options={"backend": "aot_eager", "dynamic": False})
    by_provider = {r["provider"]: r for r in rows}
    compiled, naive = by_provider["compile"], by_provider["naive"]
    assert compiled["status"] == "ok", compiled.get("error")
    assert compiled["loss_value"] == pytest.approx(naive["loss_value"], rel=1e-5)
    assert compiled["speedup_vs_naive"] > 0 and budget.spent > 0


def test_report_cli_writes_markdown(tiny, tmp_path):
    out = tmp_path / "results.jsonl"
    bench_main.main(["--only", "vicreg", "--device", "cpu", "--out", str(out), "--min-run-time", "0.02", "--no-compile"])
    md_path = tmp_path / "report.md"
    assert report.main(["--results", str(out), "--out", str(md_path)]) == 0
    text = md_path.read_text()
    assert text.startswith("### ") and "vicreg" in text and "sslops" not in text.split("\n")[0]
    assert report.render([], None).startswith("_no benchmark results_")


def test_plot_draws_pngs(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    out = tmp_path / "results.jsonl"
    bench_main.main(["--only", "tiny", "--device", "cpu", "--out", str(out), "--min-run-time", "0.02", "--no-compile"])
    paths = plot.plot(str(out), out_dir=str(tmp_path))
    assert len(paths) == 1 and os.path.getsize(paths[0]) > 1000


def test_unknown_only_and_dtype_are_rejected(tiny):
    with pytest.raises(SystemExit, match="unknown"):
        bench_main.main(["--only", "nonsense", "--device", "cpu", "--no-save"])
    with pytest.raises(SystemExit, match="dtype"):
        bench_main.main(["--dtype", "fp8", "--device", "cpu", "--no-save"])


# ----------------------------------------------------------------------------- the real bench files


@pytest.mark.parametrize("device,full", [("cpu", False), ("cpu", True), ("cuda", True)])
def test_every_bench_file_builds_its_cases(device, full):
    mods = bench_main.bench_modules()
    assert {"vicreg", "barlow_twins", "infonce", "mce"} <= set(mods)
    registry = set(sslops.backends()["reference"]["losses"]) | {"vicreg", "vicreg_relation", "barlow_twins",
                                                                "info_nce", "matrix_ssl"}
    for stem, mod in mods.items():
        cases = mod.cases(device, full)
        assert cases, stem
        for case in cases:
            assert isinstance(case, common.Case)
            assert case.loss in registry or not case.backward, case.loss  # diagnostics (bench_metrics) have no kernel
            assert case.name in mod.LOSSES or case.loss in mod.LOSSES
            assert {"N", "K"} <= set(case.shape) and case.dtype in common.DTYPE_NAMES


def test_quick_cpu_sweep_has_the_cpu_target_cases():
    titles = {case.title for _, case in bench_main.select_cases(torch.device("cpu"), False)[0]}
    for title in ("vicreg N=512 K=4096 fp32", "barlow_twins N=512 K=4096 fp32", "info_nce N=16384 K=64 fp32",
                  "matrix_ssl N=1024 K=512 fp32"):
        assert title in titles


@pytest.mark.gpu
def test_cuda_measurement_end_to_end(tmp_path):
    """On a GPU: do_bench timing, max_memory_allocated above the inputs, an OOM recorded as failed."""
    device = torch.device("cuda")
    big = 1 << 22  # 4M fp32 = 16 MB
    peak = common.peak_bytes_cuda(lambda: torch.empty(big, device=device).fill_(1.0), device)
    assert 4 * big <= peak < 4 * big + (1 << 21)

    def oom(z_a, z_b):
        return torch.empty(1 << 50, device=z_a.device).sum()  # a petabyte: always out of memory

    case = _tiny_module().cases("cuda", True)[0]
    case.extra["oom"] = oom
    rows = {r["provider"]: r for r in common.run_case(case, device, with_compile=False)}
    naive = rows["naive"]
    assert naive["status"] == "ok" and 0 < naive["p20_ms"] <= naive["median_ms"] <= naive["p80_ms"]
    assert naive["peak_mb"] > 0 and naive["peak_rss_mb"] is None
    assert rows["oom"]["status"] == "failed" and "memory" in rows["oom"]["error"].lower()
    assert rows["boom"]["status"] == "failed"
    for name, row in rows.items():  # the kernels' correctness is their own tests' job; here: recorded either way
        if name.startswith("sslops-"):
            assert (row["status"] == "ok" and row["median_ms"] > 0) or (row["status"] == "failed" and row["error"])


def test_skip_backends_records_the_reason_instead_of_running():
    case = common.Case(
        loss="vicreg", shape={"N": 8, "K": 4}, dtype=torch.float32,
        make_inputs=common.randn_inputs((8, 4), (8, 4), dtype=torch.float32),
        sslops_fn=lambda a, b, backend: sslops.vicreg_loss(a, b, backend=backend),
        naive_fn=reference.vicreg_loss, compile=False, skip_backends={"cpu": "too slow here"},
    )
    rows = {r["provider"]: r for r in common.run_case(case, torch.device("cpu"), with_compile=False, min_run_time=0.01)}
    assert rows["sslops-cpu"]["status"] == "skipped" and rows["sslops-cpu"]["error"] == "too slow here"
    assert rows["naive"]["status"] == "ok"


def test_infonce_cases_skip_the_fma_cuda_kernel_only_at_large_sizes():
    from benchmarks import bench_infonce

    big = [c for c in bench_infonce.cases("cuda", full=True) if c.shape["N"] >= 65536]
    assert big and all("cuda" in c.skip_backends for c in big)
    assert not bench_infonce.info_nce_case(32768, 256, torch.bfloat16).skip_backends


@pytest.mark.distributed
def test_distributed_bench_runs_two_ranks_end_to_end():
    """bench_distributed at a tiny size: two gloo ranks time every provider together; the
    rows carry bytes, the providers agree on the loss, rows and sums keep the cost model's bytes."""
    from benchmarks import bench_distributed
    from sslops import distributed as sd

    case = bench_distributed.distributed_case("vicreg", 6, 8)
    rows = {r["provider"]: r for r in bench_distributed.run_case(case, torch.device("cpu"), min_run_time=0.01)}
    assert set(rows) == {"naive", "sslops-rows", "sslops-sums", "sslops-auto"}, rows
    for name, row in rows.items():
        assert row["status"] == "ok" and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], (name, row)
        assert abs(row["loss_value"] - rows["naive"]["loss_value"]) <= 1e-5 * abs(rows["naive"]["loss_value"]), (name, row)
    for path in ("rows", "sums"):
        traffic = sd.collective_bytes("vicreg", path, [6, 6], 8, torch.float32)
        assert (rows[f"sslops-{path}"]["bytes_forward"], rows[f"sslops-{path}"]["bytes_backward"]) == tuple(traffic)
    assert rows["naive"]["bytes_backward"] > 0  # the official gather layer all-reduces the gradients
    line = common.result_rows(case, torch.device("cpu"), list(rows.values()), "run", "")[0]
    assert REQUIRED_FIELDS <= set(line) and line["bytes_forward"] is not None
    assert "sent MB fwd" in common.format_table(case, list(rows.values()))
