"""sslops.toy: reproducible generators with the structure their papers describe (float64, fixed seeds).

The claims these generators serve (two sigmoid neurons, the redundancy tail, masking with
backgrounds) run in tests/test_examples_seeds.py, through examples/seeds.py.
"""

import math

import pytest
import torch

from sslops import toy
from tests.utils import one_thread  # noqa: F401 (an autouse fixture: every test here on one thread)

F64 = torch.float64



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_every_generator_is_reproducible_and_seed_dependent():
    images = torch.rand(5, 8, 6, generator=_gen(0), dtype=F64) * 16
    makers = [
        lambda g: toy.hidden_feature_clusters(50, generator=g),
        lambda g: (toy.augment(torch.ones(7, 3), 0.5, g),),
        lambda g: toy.structural_redundancy(40, 4, generator=g),
    ] + [lambda g, kind=kind: (toy.add_background(images, kind, generator=g),) for kind in toy.BACKGROUNDS]
    for make in makers:
        first, again, other = make(_gen(3)), make(_gen(3)), make(_gen(4))
        _same(first, again)
        assert any(not torch.equal(x, y) for x, y in zip(first, other) if x.is_floating_point())
        for t in first:
            assert t.device.type == "cpu"
            if t.is_floating_point():
                assert t.dtype == F64


def test_hidden_feature_clusters():
    n, d, tau = 4000, 10, 7.0
    data = toy.hidden_feature_clusters(n, d=d, tau=tau, generator=_gen(1))
    assert data.x.shape == (n, d) and data.label.shape == (n,) and data.hidden.shape == (n,)
    assert set(data.label.tolist()) == {-1, 1} and set(data.hidden.tolist()) == {0, 1}
    # four equiprobable clusters, label and hidden feature independent
    cluster = (data.label + 1) + data.hidden
    counts = torch.bincount(cluster, minlength=4).double() / n
    assert float((counts - 0.25).abs().max()) < 0.03
    expected = torch.zeros(n, d, dtype=F64)
    expected[:, 0], expected[:, 1] = data.label.double(), tau * data.hidden.double()
    torch.testing.assert_close(data.centre, expected, rtol=0, atol=0)
    noise = data.x - data.centre
    assert math.isclose(float(noise.std()), d ** -1.5, rel_tol=0.03)  # ρ = d^(−3/2) by default
    assert math.isclose(float(noise.mean()), 0.0, abs_tol=4 * d ** -1.5 / math.sqrt(n * d))
    no_noise = toy.hidden_feature_clusters(9, rho=0.0, generator=_gen(2))
    torch.testing.assert_close(no_noise.x, no_noise.centre, rtol=0, atol=0)
    view = toy.augment(data.centre, 0.2, _gen(5))
    assert math.isclose(float((view - data.centre).std()), 0.2, rel_tol=0.03)


def _lstsq_residual(a, b):
    fit = a @ torch.linalg.lstsq(a, b, driver="gelsd").solution
    return float((b - fit).norm() / b.norm())


@pytest.mark.parametrize("s", [1, 3, 6])
def test_structural_redundancy_label_free_part_has_rank_s(s):
    data = toy.structural_redundancy(3000, s, generator=_gen(s))
    assert data.x1.shape == (3000, 10) and data.x2.shape == (3000, 20) and data.psi.shape == (3000, 20)
    assert data.a.shape == (20, 3) and data.b.shape == (20, s)
    assert float(data.a.abs().max()) <= 2 and float(data.b.abs().max()) <= 2
    # y: bins of ‖x1‖ at 2.5 and 3.5
    radius = data.x1.norm(dim=1)
    torch.testing.assert_close(data.y, (radius >= 2.5).long() + (radius >= 3.5).long(), rtol=0, atol=0)
    # ψ* written out sample by sample for a few rows
    for i in (0, 17, 2999):
        x1, y = data.x1[i], int(data.y[i])
        g = torch.tensor([[float(x1.max()) * math.sin(2 * math.pi * ((j / s) * float(x1.min()) + 2 * math.pi * k / 3)) for k in range(3)] for j in range(s)], dtype=F64)
        torch.testing.assert_close(data.psi[i], (data.a + data.b @ g)[:, y])
    noise = data.x2 - data.psi
    assert math.isclose(float(noise.std()), 1.0, rel_tol=0.03)
    # the part of ψ* the labels do not explain has rank exactly s
    onehot = torch.nn.functional.one_hot(data.y, 3).double()
    resid = data.psi - onehot @ torch.linalg.lstsq(onehot, data.psi).solution
    sv = torch.linalg.svdvals(resid)
    assert float(sv[s - 1]) > 1e-6 * float(sv[0]) and float(sv[s:].max()) < 1e-12 * float(sv[0])


def test_structural_redundancy_linear_recovery_fails_exactly_when_p_plus_s_exceeds_d2():
    """Claim 3, second half: onehot(y) is a linear function of ψ* (a zero least-squares residual) iff p + s ≤ d2.

    When p + s ≤ d2 the residual is at rounding level (≤ 1e-12 relative, within the 1e-8 of
    the claim). Past d2 it is small but not zero, 5e-10 to 2e-6 here: the s label-free
    directions g(x1) are sinusoids of the narrow-ranged min(x1), so their columns are nearly
    collinear and the last of them adds little. The jump at p + s = d2 + 1 is what the test
    checks: more than two orders of magnitude above the rounding level, every time.
    """
    d2 = 20
    for p, s in ((3, 16), (3, 17), (3, 18), (3, 19), (3, 22), (5, 15), (5, 16), (2, 18), (2, 19)):
        data = toy.structural_redundancy(2000, s, p=p, d2=d2, generator=_gen(100 * p + s))
        assert torch.bincount(data.y, minlength=p).min() > 50  # every class is populated
        residual = _lstsq_residual(data.psi, torch.nn.functional.one_hot(data.y, p).double())
        if p + s <= d2:
            assert residual < 1e-12, (p, s, residual)
        else:
            assert residual > 1e-10, (p, s, residual)


def test_bins_for_other_class_counts():
    assert toy._bins(2).tolist() == [3.0]
    assert toy._bins(3).tolist() == [2.5, 3.5]
    assert toy._bins(5).tolist() == [2.5, 2.5 + 1 / 3, 2.5 + 2 / 3, 3.5]


def test_add_background_kinds():
    n, h, w = 400, 8, 8
    images = torch.zeros(n, h, w, dtype=F64)
    noise = toy.add_background(images, "pixel_noise", generator=_gen(1))
    std = noise.std(dim=0)
    assert float(std.max()) < 24 * 1.2 and float(std.median()) < 24 * 0.5**3 * 1.5  # 24·u³: few loud pixels
    again = toy.add_background(images, "pixel_noise", generator=_gen(1))
    torch.testing.assert_close(noise, again, rtol=0, atol=0)
    blocky = toy.add_background(images, "blocky", generator=_gen(2))
    torch.testing.assert_close(blocky[:, ::2, ::2], blocky[:, 1::2, 1::2], rtol=0, atol=0)  # 2×2 blocks
    assert math.isclose(float(blocky.std()), 8.0, rel_tol=0.05)
    odd = toy.add_background(torch.zeros(3, 5, 7, dtype=F64), "blocky", generator=_gen(2))
    assert odd.shape == (3, 5, 7)
    ramp = toy.add_background(images, "gradient", generator=_gen(3))
    flat = ramp.reshape(n, -1)
    torch.testing.assert_close(flat.min(dim=1).values, torch.zeros(n, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(flat.max(dim=1).values, torch.full((n,), 16.0, dtype=F64), atol=1e-12, rtol=0)
    # linear in the pixel coordinates: second differences vanish
    torch.testing.assert_close(ramp[:, 2:] - 2 * ramp[:, 1:-1] + ramp[:, :-2], torch.zeros(n, h - 2, w, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ramp[:, :, 2:] - 2 * ramp[:, :, 1:-1] + ramp[:, :, :-2], torch.zeros(n, h, w - 2, dtype=F64), atol=1e-12, rtol=0)
    digits_like = torch.randint(0, 17, (4, 8, 8))
    out = toy.add_background(digits_like, "gradient", generator=_gen(3))
    assert out.dtype == F64 and float((out - digits_like).min()) >= -1e-12


def test_bad_input_names_the_argument():
    cases = [
        (lambda: toy.hidden_feature_clusters(0), ValueError, "n must be >= 1"),
        (lambda: toy.hidden_feature_clusters(5, d=1), ValueError, "d must be >= 2"),
        (lambda: toy.hidden_feature_clusters(5, rho=-1.0), ValueError, "rho must be"),
        (lambda: toy.hidden_feature_clusters(5, tau=math.nan), ValueError, "tau must be"),
        (lambda: toy.hidden_feature_clusters(2.5), TypeError, "n must be an int"),
        (lambda: toy.hidden_feature_clusters(5, generator=3), TypeError, "generator must be"),
        (lambda: toy.augment(torch.ones(3), 0.1), TypeError, "x must be a real"),
        (lambda: toy.augment(torch.ones(3, 2), -0.1), ValueError, "rho must be"),
        (lambda: toy.structural_redundancy(10, 0), ValueError, "s must be >= 1"),
        (lambda: toy.structural_redundancy(10, 2, p=1), ValueError, "p must be >= 2"),
        (lambda: toy.add_background(torch.zeros(4, 4), "gradient"), ValueError, "images must have shape"),
        (lambda: toy.add_background(torch.zeros(2, 4, 4), "stripes"), ValueError, "kind must be one of"),
        (lambda: toy.add_background([[1.0]], "gradient"), TypeError, "images must be a real"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
