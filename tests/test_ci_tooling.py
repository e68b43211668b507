"""The CI and GPU-check tooling, rehearsed on the CPU machine: .ci/install from a Python that is
itself a virtual environment (the GPU machines'), offline; the test set `bash .ci/gpu` runs;
its pytest plugin and summary writer; the rebuild stamp; where benchmark rows go."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CI = ROOT / ".ci"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"ci_{name}", CI / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _offline_env(**extra):
    """This environment with pip unable to fetch anything: no index, no find-links, no config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- .ci/install


def test_install_from_a_python_inside_a_venv_downloads_nothing(tmp_path):
    """The GPU machines' python3 is a venv holding torch (/opt/torch/.venv/bin/python3): a venv made
    from it with --system-site-packages sees its base interpreter's packages, not torch, and the
    old install then tried to download torch with no network. Here the test's own interpreter
    (a venv with torch: the project's .venv) plays that python3, with no package index."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run inside a virtual environment here: no venv python to rehearse with")
    venv = tmp_path / "venv"
    built = sorted(p.name for p in (ROOT / "sslops").glob("_C*.so"))
    env = _offline_env(PYTHON=sys.executable, SSLOPS_VENV=str(venv), SSLOPS_SKIP_EXT="1", SSLOPS_PREBUILT=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(CI / "install")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # a second venv on the same checkout leaves the checkout's compiled extension alone
    # (an earlier .ci/install deleted it, and every later test ran without the C++ kernels)
    assert sorted(p.name for p in (ROOT / "sslops").glob("_C*.so")) == built, out[-2000:]
    assert "is itself a virtual environment" in out, out
    assert "[install] torch==" not in out and "[install] triton==" not in out and "Downloading" not in out, out
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, sslops, json; print(json.dumps([torch.__file__, sslops.__file__]))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    torch_file, sslops_file = json.loads(check.stdout.strip().splitlines()[-1])
    assert pathlib.Path(sslops_file).resolve().is_relative_to(ROOT), sslops_file  # editable: this checkout
    assert not pathlib.Path(torch_file).resolve().is_relative_to(venv.resolve()), torch_file  # the parent's torch, not a new one


def test_rebuild_stamp_tracks_sources_torch_and_switches(tmp_path):
    buildinfo = _load("buildinfo")
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    shutil.copy(ROOT / "setup.py", root / "setup.py")
    base = buildinfo.fingerprint(root, env={})
    assert buildinfo.matches(base, buildinfo.fingerprint(root, env={}))
    assert not buildinfo.matches(base, buildinfo.fingerprint(root, env={"SSLOPS_DEBUG": "1"}))
    with open(root / "csrc" / "cpu" / "infonce.cpp", "a") as fh:
        fh.write("\n// edited\n")
    assert not buildinfo.matches(base, buildinfo.fingerprint(root, env={}))
    other_torch = dict(base, torch="2.11.0+cu130")
    assert not buildinfo.matches(other_torch, base)


def test_prebuilt_is_used_only_for_the_same_sources_and_torch(tmp_path):
    buildinfo = _load("buildinfo")
    pre = tmp_path / "prebuilt"
    pre.mkdir()
    assert "build.json" in buildinfo.prebuilt_mismatch(str(pre))
    info = buildinfo.fingerprint()
    (pre / "build.json").write_text(json.dumps(dict(info, file="_C.abi3.so")))
    assert "missing" in buildinfo.prebuilt_mismatch(str(pre))
    (pre / "_C.abi3.so").write_bytes(b"")
    assert buildinfo.prebuilt_mismatch(str(pre)) is None
    (pre / "build.json").write_text(json.dumps(dict(info, file="_C.abi3.so", torch="2.11.0+cu130")))
    assert "torch" in buildinfo.prebuilt_mismatch(str(pre))


# ----------------------------------------------------------------------------- .ci/gpu: the test set


def test_gpu_plan_is_the_gpu_relevant_set():
    """`bash .ci/gpu plan` collects exactly what the GPU run executes: kernel tests of every family,
    nothing the CPU machine already settles (sm_90 AOT, nvcc, gloo, packaging)."""
    proc = subprocess.run(["bash", str(CI / "gpu"), "plan"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected, deselected = {}, {}
    for line in proc.stdout.splitlines():
        parts = line.split(" ")
        if parts[0] in ("SELECTED", "DESELECTED") and len(parts) >= 2:
            (selected if parts[0] == "SELECTED" else deselected)[parts[1]] = set(filter(None, (parts[2] if len(parts) > 2 else "").split(",")))
    assert selected, proc.stdout[-2000:]
    files = {nodeid.split("::")[0] for nodeid in selected}
    for family in ("vicreg", "barlow_twins", "infonce", "matrix_info", "column_moments"):
        assert f"tests/test_{family}.py" in files, (family, sorted(files))
    for path in ("tests/test_packaging.py", "tests/test_cuda_compile.py", "tests/test_triton_sm90.py", "tests/test_distributed.py",
                 "tests/test_ci_tooling.py"):
        assert path not in files, path
    for nodeid, marks in selected.items():
        assert marks & {"gpu", "triton", "cuda_tensors"} and not marks & {"triton_aot", "cuda_compile", "distributed"}, (nodeid, marks)
    summary = _load("gpu_summary")
    kernel_files = {f"tests/test_{family}.py" for family in ("vicreg", "barlow_twins", "infonce", "matrix_info", "column_moments")}
    for nodeid, marks in deselected.items():  # a kernel test parametrized with a GPU backend that the GPU run would miss
        if nodeid.split("::")[0] in kernel_files and not marks & {"triton_aot", "cuda_compile", "distributed"}:
            assert summary.backend_param_of(nodeid) not in ("triton", "cuda"), nodeid
    bench = [line for line in proc.stdout.splitlines() if line.startswith("# bench:")]
    for family in ("info_nce", "vicreg", "barlow_twins", "matrix_ssl", "vicreg_relation", "mce"):
        assert any(f" {family} " in line or f" {family}[" in line for line in bench), (family, bench)


# ----------------------------------------------------------------------------- .ci/gpu: plugin and summary


def test_plugin_records_the_worst_error_of_each_test(tmp_path):
    pkg = tmp_path / "tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "utils.py").write_text(textwrap.dedent("""
        def assert_error_within(kernel, naive, exact, *, factor=2.0):
            err = float((kernel.double() - exact.double()).abs().max())
            bound = factor * float((naive.double() - exact.double()).abs().max())
            assert err <= bound
            return err, bound / factor, bound
    """))
    (pkg / "conftest.py").write_text("import tests.utils  # noqa: F401  (as sslops' conftest does)\n")
    (pkg / "test_fake.py").write_text(textwrap.dedent("""
        import torch
        from tests.utils import assert_error_within

        def test_close():
            e = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
            torch.testing.assert_close(e + torch.tensor([0.0, 4e-6, 0.0], dtype=torch.float64), e, atol=1e-5, rtol=0)
            torch.testing.assert_close(e + torch.tensor([0.0, 0.0, 2e-6], dtype=torch.float64), e, atol=1e-5, rtol=0)

        def test_rule():
            e = torch.tensor([2.0, -8.0], dtype=torch.float64)
            assert_error_within(e + torch.tensor([0.0, 8e-3], dtype=torch.float64), e + 0.01, e)

        def test_far():
            torch.testing.assert_close(torch.ones(3), torch.zeros(3))
    """))
    env = dict(os.environ, PYTHONPATH=str(CI))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_pytest_plugin", "-p", "no:cacheprovider",
                           f"--junitxml={tmp_path / 'junit.xml'}", "tests"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # test_far fails, as it should
    cases = {c["nodeid"].split("::")[-1]: c for c in _load("gpu_summary").read_junit(str(tmp_path / "junit.xml"))}
    assert cases["test_close"]["outcome"] == "passed" and cases["test_close"]["max_rel_err"] == pytest.approx(1e-6, rel=1e-3)
    assert cases["test_rule"]["max_rel_err"] == pytest.approx(1e-3, rel=1e-3) and cases["test_rule"]["rule_ratio"] == pytest.approx(0.4, rel=1e-3)
    assert cases["test_far"]["outcome"] == "failed" and cases["test_far"]["max_rel_err"] == pytest.approx(1.0)


FAKE_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="2" skipped="1" tests="6">
<testcase classname="tests.test_vicreg" name="test_matches_reference[triton-97-129-dtype1-0]" time="1.0">
  <properties><property name="max_rel_err" value="3.100e-06"/></properties></testcase>
<testcase classname="tests.test_vicreg" name="test_matches_reference[triton-97-129-torch.bfloat16-0]" time="1.0">
  <properties><property name="max_rel_err" value="4.000e-03"/><property name="rule_ratio" value="0.700"/></properties></testcase>
<testcase classname="tests.test_vicreg" name="test_matches_reference[cuda-97-129-dtype1-0]" time="1.0">
  <properties><property name="max_rel_err" value="2.000e-01"/></properties>
  <failure message="AssertionError: Tensor-likes are not close!">long traceback</failure></testcase>
<testcase classname="tests.test_infonce" name="test_triton_matches_reference[1025-64-labels]" time="1.0"/>
<testcase classname="tests.test_infonce" name="test_gpu_launch[cuda]" time="1.0">
  <error message="RuntimeError: CUDA error: an illegal memory access was encountered">tb</error></testcase>
<testcase classname="tests.test_matrix_info" name="test_tf32[triton]" time="0.1">
  <skipped type="pytest.skip" message="not on this GPU">skip</skipped></testcase>
</testsuite></testsuites>
"""


def _fake_rows():
    base = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "commit": "abcdef1234567",
            "loss": "vicreg", "shape": {"N": 2048, "K": 8192}, "dtype": "bf16"}
    rows = [dict(base, provider="naive", status="ok", median_ms=10.0, peak_mb=800.0),
            dict(base, provider="sslops-triton", status="ok", median_ms=2.5, peak_mb=100.0),
            dict(base, provider="sslops-cuda", status="failed", error="RuntimeError: boom"),
            dict(base, provider="compile", status="skipped", error="compile pass later"),
            dict(base, provider="compile", status="ok", median_ms=5.0, peak_mb=400.0),
            dict(base, loss="info_nce", shape={"N": 262144, "K": 256}, provider="naive", status="failed",
                 error="OutOfMemoryError: CUDA out of memory. Tried to allocate 128 GiB")]
    return rows


def test_summary_of_a_fake_run(tmp_path):
    (tmp_path / "junit.xml").write_text(FAKE_JUNIT)
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in _fake_rows()) + "\n")
    (tmp_path / "tests.log").write_text("16 workers [9 items]\n....F.E.s\n")
    (tmp_path / "build.log").write_text("[install] using the prebuilt extension in .prebuilt (_C.abi3.so)\n"
                                        "[install] sslops 0.1.0 from /x/sslops/__init__.py {}\n")
    proc = subprocess.run([sys.executable, str(CI / "gpu_summary.py"), str(tmp_path), "--stages", "install=21:0,tests=250:1,bench=150:0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.txt").read_text()
    assert text == proc.stdout
    lines = text.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 200
    assert "NVIDIA H200" in text and "torch 2.11.0+cu130" in text
    assert "install 21 s (exit 0), tests 250 s (exit 1), bench 150 s (exit 0); total 421 s" in text
    assert "using the prebuilt extension" in text
    assert "tests: 3 passed, 2 failed, 1 skipped, 3 not run (of 9 selected)" in text

    def row(family, backend):
        (line,) = [ln for ln in lines if ln.split()[:2] == [family, backend]]
        return line.split()

    assert row("vicreg", "triton")[2:5] == ["2", "0", "0"] and row("vicreg", "triton")[5:] == ["4.0e-03", "(bf16)", "[0.70]"]
    assert row("vicreg", "cuda")[2:6] == ["0", "1", "0", "2.0e-01"]
    assert row("infonce", "cuda")[2:6] == ["0", "1", "0", "-"]
    assert row("matrix_info", "triton")[2:5] == ["0", "0", "1"]
    assert "tests/test_infonce.py::test_gpu_launch[cuda]: RuntimeError: CUDA error: an illegal memory access" in text
    (bench_vicreg,) = [ln for ln in lines if ln.strip().startswith("vicreg N=2048 K=8192 bf16")]
    assert "naive 10 800MB" in bench_vicreg and "triton 2.5 (4.00x) 100MB" in bench_vicreg
    assert "cuda FAILED" in bench_vicreg and "compile 5 (2.00x) 400MB" in bench_vicreg
    assert "naive FAILED (OOM)" in text


def test_summary_of_a_run_that_produced_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(CI / "gpu_summary.py"), str(tmp_path), "--stages", "install=300:124"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.txt").read_text()
    assert "install 300 s (exit 124)" in text and "no test results" in text and "benchmarks: no rows" in text
    assert "build: no build.log" in text


# ----------------------------------------------------------------------------- benchmarks' results file


def test_benchmark_runs_write_to_an_untracked_file():
    """`python -m benchmarks` (and so `bash .ci/bench`) appends to a git-ignored file; the committed
    results.jsonl changes only when results are curated on purpose."""
    from benchmarks import __main__ as main

    out = main.parse_args([]).out
    assert os.path.basename(out) != "results.jsonl"
    rel = os.path.relpath(out, ROOT)
    ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT, timeout=60)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{rel} is not ignored by git: a benchmark run would show up as a change"
