"""examples/train_digits.py at a tiny budget: every sslops loss trains the encoder past the random one.

Measured (1 thread, seed 0, scikit-learn 1.9.1, torch 2.13.0 CPU), few-label linear probe on
the 500 test digits, random encoder 77.1 %:

- full runs (300 steps, batch 256, the README's table): 89.1–92.8 % for the self-supervised
  losses (margin ≥ 12.0 points), SupCon 98.6 %, supervised 98.1 %;
- this test's budget (30 steps, batch 128): 83.6–88.2 % (margin ≥ 6.5 points), SupCon 94.6 %,
  supervised 93.5 %.

The test asks for half the smallest margin measured at its budget: 3 points.
"""

import importlib.util
import math
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARGIN = 3.0

pytest.importorskip("sklearn", reason="train_digits runs on scikit-learn's bundled digits (.ci/install installs it)")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_digits = _load("train_digits")


@pytest.fixture(scope="module")
def tiny_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield train_digits.run(steps=30, batch_size=128, eval_every=15, quiet=True)
    finally:
        torch.set_num_threads(threads)


def test_every_loss_beats_the_random_encoder(tiny_run):
    results, _ = tiny_run
    random = results["random encoder"]
    assert set(results) == {"pixels", "random encoder", "supervised", *train_digits.LOSSES}
    for name in train_digits.LOSSES + ("supervised",):
        r = results[name]
        assert r["probe"] >= random["probe"] + MARGIN, (name, r["probe"], random["probe"])
        assert r["knn"] > random["knn"], (name, r["knn"], random["knn"])
        assert 1.0 <= r["rankme"] <= train_digits.EMBED + 1e-6 and r["ms_per_step"] > 0 and math.isfinite(r["seconds"])
    assert 70 < random["probe"] < 85  # a random MLP already separates digits fairly well: the reason for 10 labels per class


def test_curves_table_and_figure(tiny_run, tmp_path, capsys):
    results, curves = tiny_run
    for name in train_digits.LOSSES:
        assert [step for step, _ in curves[name]] == [15, 30]
    train_digits.print_table(results)
    printed = capsys.readouterr().out
    assert all(name in printed for name in results)
    pytest.importorskip("matplotlib")
    train_digits.plot(curves, results["random encoder"], str(tmp_path))
    assert (tmp_path / "train_digits.png").stat().st_size > 10_000


def test_augment_and_split_are_reproducible():
    x_train, y_train, x_test, y_test = train_digits.load_split()
    assert x_train.shape == (1297, 1, 8, 8) and x_test.shape == (500, 1, 8, 8)
    assert set(y_test.tolist()) == set(range(10))
    a = train_digits.augment(x_train[:7], torch.Generator().manual_seed(1))
    b = train_digits.augment(x_train[:7], torch.Generator().manual_seed(1))
    assert a.shape == (7, 64) and torch.equal(a, b)
    draws = train_digits.labelled_draws(y_train)
    assert len(draws) == train_digits.DRAWS
    for idx in draws:
        assert torch.equal(torch.bincount(y_train[idx], minlength=10), torch.full((10,), train_digits.LABELLED_PER_CLASS))
    with pytest.raises(ValueError, match="unknown loss"):
        train_digits.loss_step("byol", train_digits.make_model(0), x_train[:4], y_train[:4], torch.Generator())
