"""sslops.reference against independent textbook forms.

The reference is the oracle for every backend, so nothing here compares it with itself.
Expected values come from explicit Python loops over rows, features and pairs on plain
float64 Python numbers (``math``, lists), or from tiny cases worked out by hand in the
comments. Sizes stay small (N <= 9, K <= 5) so the loops are quick.
"""

import ast
import inspect
import math

import pytest
import torch

from sslops import reference as ref

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def _spread(g, n, k):
    """Random (n, k) with per-feature scales from 0.3 to 2, so some VICReg hinges fire."""
    return _randn(g, n, k) * torch.linspace(0.3, 2.0, k, dtype=F64)


def _close(actual, expected, tol=1e-10):
    assert isinstance(actual, torch.Tensor)
    assert actual.dtype == F64
    assert math.isclose(float(actual.detach()), expected, rel_tol=tol, abs_tol=tol), (
        float(actual.detach()), expected)


# ----------------------------------------------------------------------------- textbook loops


def _column_means(x):
    n, k = len(x), len(x[0])
    return [sum(x[i][c] for i in range(n)) / n for c in range(k)]


def _covariance_loop(x, ddof):
    n, k = len(x), len(x[0])
    m = _column_means(x)
    return [[sum((x[i][a] - m[a]) * (x[i][b] - m[b]) for i in range(n)) / (n - ddof)
             for b in range(k)] for a in range(k)]


def _off_diag_sq(c):
    k = len(c)
    return sum(c[a][b] ** 2 for a in range(k) for b in range(k) if a != b)


def _vicreg_loop(a, b, sim, std, cov_c, eps):
    n, k = len(a), len(a[0])
    inv = sum((a[i][c] - b[i][c]) ** 2 for i in range(n) for c in range(k)) / (n * k)
    var = cov = 0.0
    for x in (a, b):
        m = _column_means(x)
        for c in range(k):
            variance = sum((x[i][c] - m[c]) ** 2 for i in range(n)) / (n - 1)
            var += max(0.0, 1.0 - math.sqrt(variance + eps)) / k / 2
        cov += _off_diag_sq(_covariance_loop(x, 1)) / k
    return sim * inv + std * var + cov_c * cov


def _relation_from_labels_loop(labels):
    n = len(labels)
    return [[1 if i != j and labels[i] == labels[j] else 0 for j in range(n)]
            for i in range(n)]


def _relation_from_pairs_loop(n, rows, cols):
    g = [[0] * n for _ in range(n)]
    for r, c in zip(rows, cols):
        if r != c:
            g[r][c] = g[c][r] = 1
    return g


def _vicreg_relation_loop(z, g, alpha, beta, gamma, eps):
    n, k = len(z), len(z[0])
    c = _covariance_loop(z, 1)
    var = sum(max(0.0, 1.0 - math.sqrt(c[f][f] + eps)) for f in range(k)) / k
    cov = _off_diag_sq(c) / k
    nnz = sum(map(sum, g))
    dist = sum(sum((z[i][f] - z[j][f]) ** 2 for f in range(k))
               for i in range(n) for j in range(n) if g[i][j])
    inv = dist / (nnz * k) if nnz else 0.0
    return alpha * var + beta * cov + gamma * inv


def _barlow_loop(a, b, lambd, eps):
    n, k = len(a), len(a[0])

    def bn(x):
        m = _column_means(x)
        v = [sum((x[i][c] - m[c]) ** 2 for i in range(n)) / n for c in range(k)]
        return [[(x[i][c] - m[c]) / math.sqrt(v[c] + eps) for c in range(k)]
                for i in range(n)]

    na, nb = bn(a), bn(b)
    c = [[sum(na[i][p] * nb[i][q] for i in range(n)) / n for q in range(k)]
         for p in range(k)]
    return sum((c[p][p] - 1) ** 2 for p in range(k)) + lambd * _off_diag_sq(c)


def _info_nce_loop(z, g, tau):
    """(loss, per-row ℓ, per-row |P|) from the SupCon L_out definition, row by row."""
    n = len(z)
    norms = [max(math.sqrt(sum(v * v for v in row)), 1e-12) for row in z]
    s = [[sum(x * y for x, y in zip(z[i], z[j])) / (norms[i] * norms[j]) for j in range(n)]
         for i in range(n)]
    rows, counts = [], []
    for i in range(n):
        positives = [j for j in range(n) if g[i][j]]
        counts.append(len(positives))
        if not positives:
            rows.append(0.0)
            continue
        lse = math.log(sum(math.exp(s[i][a] / tau) for a in range(n) if a != i))
        rows.append(-sum(s[i][p] / tau - lse for p in positives) / len(positives))
    anchors = sum(1 for c in counts if c)
    return (sum(rows) / anchors if anchors else 0.0), rows, counts


def _matmul_loop(a, b):
    return [[sum(a[i][t] * b[t][j] for t in range(len(b))) for j in range(len(b[0]))]
            for i in range(len(a))]


def _series_log_loop(q, order):
    k = len(q)
    x = [[q[i][j] - (1.0 if i == j else 0.0) for j in range(k)] for i in range(k)]
    out = [[0.0] * k for _ in range(k)]
    power = x
    for m in range(1, order + 1):
        out = [[out[i][j] + (-1) ** (m + 1) / m * power[i][j] for j in range(k)]
               for i in range(k)]
        power = _matmul_loop(power, x)
    return out


def _matrix_ssl_loop(p, z, lambd, mu, gamma, order):
    n, k = len(p), len(p[0])

    def unit_rows(x):
        return [[v / max(math.sqrt(sum(w * w for w in row)), 1e-12) for v in row] for row in x]

    def centred(x):
        m = _column_means(x)
        return [[x[i][c] - m[c] for c in range(k)] for i in range(n)]

    pc, zc = centred(unit_rows(p)), centred(unit_rows(z))

    def gram(x, y):  # xᵀ y / n + mu I
        return [[sum(x[i][a] * y[i][b] for i in range(n)) / n + (mu if a == b else 0.0)
                 for b in range(k)] for a in range(k)]

    log_u = _series_log_loop(gram(pc, zc), order)
    uniformity = -lambd * sum(log_u[a][a] for a in range(k))
    p_a, log_a = gram(pc, pc), _series_log_loop(gram(zc, zc), order)
    alignment = -sum(p_a[a][b] * log_a[b][a] for a in range(k) for b in range(k))
    return uniformity + gamma * alignment


# ----------------------------------------------------------------------------- module hygiene


def test_module_imports_only_torch_and_math():
    tree = ast.parse(inspect.getsource(ref))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in reference.py"
            imported.add(node.module)
    assert imported <= {"torch", "torch.nn.functional", "math"}, imported


# ----------------------------------------------------------------------------- VICReg


@pytest.mark.parametrize("seed,n,k", [(0, 2, 1), (1, 3, 4), (2, 7, 5), (3, 9, 3)])
def test_vicreg_matches_loops(seed, n, k):
    g = _gen(seed)
    a, b = _spread(g, n, k), _spread(g, n, k)
    for coeffs in [(25.0, 25.0, 1.0, 1e-4), (1.5, 0.7, 2.0, 1e-2)]:
        got = ref.vicreg_loss(a, b, sim_coeff=coeffs[0], std_coeff=coeffs[1],
                              cov_coeff=coeffs[2], eps=coeffs[3])
        _close(got, _vicreg_loop(a.tolist(), b.tolist(), *coeffs))


def test_vicreg_hand_case():
    # z_a = [[0, 0], [2, 2]]: mean (1, 1), centred ±(1, 1), unbiased C = [[2, 2], [2, 2]];
    #   std = sqrt(2 + 1e-4) > 1, hinge 0; off-diagonal Σ C² / K = (4 + 4) / 2 = 4.
    # z_b = [[0, 1], [0, 1]]: constant columns, C = 0; std = sqrt(1e-4) = 0.01,
    #   hinge 0.99 per feature, mean 0.99; halved: 0.495. cov 0.
    # inv = ((0-0)² + (0-1)² + (2-0)² + (2-1)²) / 4 = 6/4 = 1.5
    # loss = 25·1.5 + 25·(0 + 0.495) + 1·(4 + 0) = 37.5 + 12.375 + 4 = 53.875
    z_a = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=F64)
    z_b = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F64)
    _close(ref.vicreg_loss(z_a, z_b), 53.875)
    # solo-learn's unhalved variance term: the same inputs with std_coeff=50 add 12.375.
    _close(ref.vicreg_loss(z_a, z_b, std_coeff=50.0), 53.875 + 12.375)


@pytest.mark.parametrize("seed,labels,k", [
    (10, [0, 1, 0, 2, 1, 0], 3),
    (11, [4, 4, 4, 4, 4, 4, 4], 2),
    (12, [0, 1, 2, 0, 1, 2, 3, 3, 5], 5),
])
def test_vicreg_relation_labels_matches_loops(seed, labels, k):
    g = _gen(seed)
    z = _spread(g, len(labels), k)
    G = _relation_from_labels_loop(labels)
    for coeffs in [(25.0, 1.0, 25.0, 1e-4), (0.3, 2.0, 1.7, 1e-3)]:
        got = ref.vicreg_relation_loss(z, labels=torch.tensor(labels), alpha=coeffs[0],
                                       beta=coeffs[1], gamma=coeffs[2], eps=coeffs[3])
        _close(got, _vicreg_relation_loop(z.tolist(), G, *coeffs))


def test_vicreg_relation_pairs_matches_loops():
    g = _gen(13)
    n, k = 8, 4
    z = _spread(g, n, k)
    rows = [0, 3, 5, 5, 7, 2, 6, 3]
    cols = [1, 0, 2, 2, 7, 5, 6, 0]   # (5, 2) twice, (2, 5) reversed, (3, 0) twice, self-pairs
    G = _relation_from_pairs_loop(n, rows, cols)
    got = ref.vicreg_relation_loss(z, pairs=torch.tensor([rows, cols]))
    _close(got, _vicreg_relation_loop(z.tolist(), G, 25.0, 1.0, 25.0, 1e-4))


def test_vicreg_relation_hand_case():
    # z = [[0], [0.5], [1]], labels [0, 0, 1]: G pairs (0, 1) and (1, 0), nnz = 2.
    # inv = (0.5² + 0.5²) / (2·1) = 0.25.
    # mean 0.5, deviations -0.5, 0, 0.5: unbiased variance 0.5 / 2 = 0.25,
    #   hinge = 1 - sqrt(0.25 + 1e-4) = 1 - sqrt(0.2501). K = 1: no covariance term.
    # loss = 25·(1 - sqrt(0.2501)) + 25·0.25
    z = torch.tensor([[0.0], [0.5], [1.0]], dtype=F64)
    got = ref.vicreg_relation_loss(z, labels=torch.tensor([0, 0, 1]))
    _close(got, 25 * (1 - math.sqrt(0.2501)) + 25 * 0.25)


@pytest.mark.parametrize("seed,n,k", [(20, 3, 2), (21, 4, 5)])
def test_vicreg_relation_inv_is_two_view_mse(seed, n, k):
    g = _gen(seed)
    a, b = _randn(g, n, k), _randn(g, n, k)
    z = torch.cat([a, b])
    mse = sum((x - y) ** 2 for ra, rb in zip(a.tolist(), b.tolist())
              for x, y in zip(ra, rb)) / (n * k)
    one_way = torch.stack([torch.arange(n), torch.arange(n) + n])    # i -> i + N only
    for kwargs in [dict(pairs=one_way), dict(pairs=one_way.flip(0)),
                   dict(labels=torch.arange(n).repeat(2))]:
        inv = ref.vicreg_relation_loss(z, alpha=0.0, beta=0.0, gamma=1.0, **kwargs)
        _close(inv, mse)
    _close(ref.vicreg_loss(a, b, sim_coeff=1.0, std_coeff=0.0, cov_coeff=0.0), mse)


def test_vicreg_relation_without_pairs_has_zero_invariance():
    g = _gen(22)
    z = _spread(g, 6, 3).requires_grad_()
    with_gamma = ref.vicreg_relation_loss(z, labels=torch.arange(6), gamma=25.0)
    without = ref.vicreg_relation_loss(z, labels=torch.arange(6), gamma=0.0)
    _close(with_gamma.detach(), float(without.detach()))
    only_self = torch.tensor([[0, 1, 2], [0, 1, 2]])
    inv = ref.vicreg_relation_loss(z, pairs=only_self, alpha=0.0, beta=0.0, gamma=1.0)
    assert float(inv.detach()) == 0.0
    inv.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# ----------------------------------------------------------------------------- Barlow Twins


@pytest.mark.parametrize("seed,n,k", [(30, 2, 1), (31, 5, 3), (32, 9, 5)])
def test_barlow_twins_matches_loops(seed, n, k):
    g = _gen(seed)
    a = _spread(g, n, k)
    b = a + 0.5 * _randn(g, n, k)   # correlated views, so both terms matter
    _close(ref.barlow_twins_loss(a, b), _barlow_loop(a.tolist(), b.tolist(), 0.0051, 1e-5))
    _close(ref.barlow_twins_loss(a, b, lambd=0.3, eps=1e-3),
           _barlow_loop(a.tolist(), b.tolist(), 0.3, 1e-3))


def test_barlow_twins_hand_case():
    # z_a = [[0], [2]]: mean 1, biased variance 1, bn = (-1, 1) / sqrt(1 + 1e-5).
    # z_b = [[4], [0]]: mean 2, biased variance 4, bn = (2, -2) / sqrt(4 + 1e-5).
    # c = ((-1)(2) + (1)(-2)) / (sqrt(1.00001)·sqrt(4.00001)) / 2 = -2 / (sqrt(1.00001)·sqrt(4.00001))
    # K = 1: loss = (c - 1)², close to 4.
    z_a = torch.tensor([[0.0], [2.0]], dtype=F64)
    z_b = torch.tensor([[4.0], [0.0]], dtype=F64)
    c = -2 / (math.sqrt(1.00001) * math.sqrt(4.00001))
    _close(ref.barlow_twins_loss(z_a, z_b), (c - 1) ** 2)


# ----------------------------------------------------------------------------- relation matrix


def test_relation_matrix_from_labels():
    labels = torch.tensor([0, 1, 0, 2, 1])
    expected = torch.tensor([[0, 0, 1, 0, 0],
                             [0, 0, 0, 0, 1],
                             [1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0],     # label 2 appears once: no positive
                             [0, 1, 0, 0, 0]], dtype=torch.bool)
    G = ref.relation_matrix(5, labels=labels)
    assert G.dtype == torch.bool and G.shape == (5, 5)
    assert torch.equal(G, expected)
    assert torch.equal(G, torch.tensor(_relation_from_labels_loop(labels.tolist()),
                                       dtype=torch.bool))


def test_relation_matrix_from_pairs():
    # (0, 1) given three times (once reversed), (1, 1) and (3, 3) are self-pairs,
    # (2, 4) given once: G = {(0,1), (1,0), (2,4), (4,2)}.
    rows = [0, 1, 1, 2, 3, 0]
    cols = [1, 0, 1, 4, 3, 1]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = expected[2, 4] = expected[4, 2] = True
    for pairs in [torch.tensor([rows, cols]), (torch.tensor(rows), torch.tensor(cols))]:
        G = ref.relation_matrix(5, pairs=pairs, device="cpu")
        assert G.dtype == torch.bool
        assert torch.equal(G, expected)
        assert torch.equal(G, G.T)
        assert not G.diagonal().any()


def test_relation_matrix_needs_exactly_one_source():
    with pytest.raises(ValueError):
        ref.relation_matrix(3)
    with pytest.raises(ValueError):
        ref.relation_matrix(3, labels=torch.arange(3), pairs=torch.zeros(2, 1, dtype=torch.long))


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("seed,labels,tau", [
    (40, list(range(4)) * 2, 0.1),                        # SimCLR, 2 views
    (41, list(range(3)) * 3, 0.5),                        # 3 views of 3 samples
    (42, [0, 0, 1, 2, 2, 2, 3, 0, 4], 0.2),               # SupCon: 1, 3, 4 are lone anchors
])
def test_info_nce_labels_matches_loops(seed, labels, tau):
    g = _gen(seed)
    z = _randn(g, len(labels), 5)
    expected, rows, counts = _info_nce_loop(z.tolist(), _relation_from_labels_loop(labels), tau)
    _close(ref.info_nce_loss(z, labels=torch.tensor(labels), temperature=tau), expected)
    got_rows, got_counts = ref.info_nce_rows(z, labels=torch.tensor(labels), temperature=tau)
    assert got_rows.shape == (len(labels),)
    for got, want in zip(got_rows.tolist(), rows):
        assert math.isclose(got, want, rel_tol=1e-10, abs_tol=1e-10)
    assert got_counts.dtype == F64 and got_counts.tolist() == [float(c) for c in counts]


def test_info_nce_pairs_matches_loops():
    g = _gen(43)
    n = 7
    z = _randn(g, n, 3)
    rows = [0, 1, 2, 4, 4, 5, 6, 2]
    cols = [1, 0, 3, 5, 6, 5, 4, 3]   # duplicate (0,1)/(1,0) and (2,3), self-pair (5,5)
    G = _relation_from_pairs_loop(n, rows, cols)
    expected, _, _ = _info_nce_loop(z.tolist(), G, 0.3)
    _close(ref.info_nce_loss(z, pairs=torch.tensor([rows, cols]), temperature=0.3), expected)


def test_info_nce_pairs_and_labels_agree():
    g = _gen(44)
    labels = [0, 0, 1, 1, 1, 2]
    z = _randn(g, 6, 4)
    pairs = torch.tensor([(i, j) for i in range(6) for j in range(i + 1, 6)
                          if labels[i] == labels[j]]).T
    by_pairs = ref.info_nce_loss(z, pairs=pairs, temperature=0.7)
    expected, _, _ = _info_nce_loop(z.tolist(), _relation_from_labels_loop(labels), 0.7)
    _close(by_pairs, expected)
    _close(ref.info_nce_loss(z, labels=torch.tensor(labels), temperature=0.7), expected)


def test_info_nce_hand_cases():
    # z = [[3, 0], [0, 0.5], [2, 0]], labels [7, 1, 7], τ = 1.
    # Unit rows: (1, 0), (0, 1), (1, 0), so s_01 = 0, s_02 = 1, s_12 = 0.
    # Anchor 0: P = {2}; ℓ_0 = log(e^0 + e^1) - 1 = log(1 + e) - 1. Anchor 2: the same.
    # Anchor 1 has no positive and drops out of the mean: loss = log(1 + e) - 1 ≈ 0.3133.
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 0.0]], dtype=F64)
    labels = torch.tensor([7, 1, 7])
    _close(ref.info_nce_loss(z, labels=labels, temperature=1.0), math.log(1 + math.e) - 1)
    # τ = 0.5 doubles the logits: loss = log(1 + e²) - 2.
    _close(ref.info_nce_loss(z, labels=labels, temperature=0.5), math.log(1 + math.e ** 2) - 2)
    # Three views of one sample, z = [[1, 0], [1, 0], [0, 1]], τ = 1:
    # anchor 0: P = {1, 2}, s = 1, 0; ℓ_0 = log(e + 1) - (1 + 0)/2. Anchor 1: the same.
    # anchor 2: P = {0, 1}, s = 0, 0; ℓ_2 = log(1 + 1) - 0 = log 2.
    # loss = (2·(log(1 + e) - 0.5) + log 2) / 3.
    z3 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    _close(ref.info_nce_loss(z3, labels=torch.tensor([0, 0, 0]), temperature=1.0),
           (2 * (math.log(1 + math.e) - 0.5) + math.log(2)) / 3)


def test_info_nce_zero_row_uses_normalize_eps():
    # An all-zero row normalises to 0 (norm clamped to 1e-12), so all its similarities are 0.
    # z = [[0, 0], [1, 0], [2, 0]], labels [0, 1, 1], τ = 1: anchor 1 has s_10 = 0,
    # s_12 = 1: ℓ_1 = log(e^0 + e^1) - 1; anchor 2 the same; loss = log(1 + e) - 1.
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=F64)
    _close(ref.info_nce_loss(z, labels=torch.tensor([0, 1, 1]), temperature=1.0),
           math.log(1 + math.e) - 1)


@pytest.mark.parametrize("seed,n,tau", [(50, 1, 0.5), (51, 4, 0.5), (52, 5, 0.07)])
def test_nt_xent_is_info_nce_with_sample_labels(seed, n, tau):
    g = _gen(seed)
    a, b = _randn(g, n, 3), _randn(g, n, 3)
    got = ref.nt_xent_loss(a, b, temperature=tau)
    labels = list(range(n)) * 2
    expected, _, _ = _info_nce_loop(torch.cat([a, b]).tolist(),
                                    _relation_from_labels_loop(labels), tau)
    _close(got, expected)
    _close(ref.info_nce_loss(torch.cat([a, b]), labels=torch.tensor(labels), temperature=tau),
           expected)


def test_nt_xent_default_temperature_is_half():
    g = _gen(53)
    a, b = _randn(g, 3, 4), _randn(g, 3, 4)
    expected, _, _ = _info_nce_loop(torch.cat([a, b]).tolist(),
                                    _relation_from_labels_loop([0, 1, 2] * 2), 0.5)
    _close(ref.nt_xent_loss(a, b), expected)


def test_info_nce_without_positives_is_zero_with_zero_grad():
    g = _gen(54)
    z = _randn(g, 6, 3).requires_grad_()
    for kwargs in [dict(labels=torch.arange(6)),
                   dict(pairs=torch.tensor([[0, 3], [0, 3]]))]:   # self-pairs only
        z.grad = None
        loss = ref.info_nce_loss(z, temperature=0.1, **kwargs)
        assert loss.dtype == F64 and float(loss.detach()) == 0.0
        loss.backward()
        assert torch.equal(z.grad, torch.zeros_like(z))


def test_info_nce_rows_windows_sum_to_full_loss():
    g = _gen(55)
    labels = [0, 1, 0, 2, 3, 3, 1, 4, 3]     # anchors 3 and 7 have no positive
    n = len(labels)
    z = _randn(g, n, 4)
    expected, rows, counts = _info_nce_loop(z.tolist(), _relation_from_labels_loop(labels), 0.2)
    lab = torch.tensor(labels)
    pieces, piece_counts = [], []
    for start, end in [(0, 2), (2, 5), (5, n)]:
        loss_rows, count = ref.info_nce_rows(z, labels=lab, temperature=0.2,
                                             row_start=start, row_end=end)
        assert loss_rows.shape == (end - start,) and count.shape == (end - start,)
        for got, want in zip(loss_rows.tolist(), rows[start:end]):
            assert math.isclose(got, want, rel_tol=1e-10, abs_tol=1e-10)
        assert count.tolist() == [float(c) for c in counts[start:end]]
        pieces.append(loss_rows)
        piece_counts.append(count)
    total = torch.cat(pieces).sum() / (torch.cat(piece_counts) > 0).sum()
    _close(total, expected)
    _close(ref.info_nce_loss(z, labels=lab, temperature=0.2), expected)


# ----------------------------------------------------------------------------- the contrastive family (conventions §3b)
# Each peer's formula written out from its definition (our own code, the peer's math), on the
# same inputs as the reference: open_clip's ClipLoss and SigLipLoss (logits from normalised
# features), lightly's NTXentLoss with a memory bank, DCL as the paper's Eq. 6 and its authors'
# code compute it (the −inf mask there is an additive log(1e-45)), DCLW with lightly's weights.

import torch.nn.functional as TF  # noqa: E402


def _unit(x):
    return TF.normalize(x, dim=1)


def _open_clip_clip_loss(image_features, text_features, logit_scale):
    labels = torch.arange(image_features.shape[0])
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    return (TF.cross_entropy(logits_per_image, labels) + TF.cross_entropy(logits_per_text, labels)) / 2


def _open_clip_siglip_loss(image_features, text_features, logit_scale, logit_bias):
    n = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(n, dtype=logits.dtype) - torch.ones(n, n, dtype=logits.dtype)
    return -TF.logsigmoid(labels * logits).sum() / n


def _lightly_memory_bank_nt_xent(out0, out1, bank, tau):
    out0, out1, bank = _unit(out0), _unit(out1), _unit(bank)
    sim_pos = (out0 * out1).sum(dim=1, keepdim=True)
    sim_neg = out0 @ bank.T
    logits = torch.cat([sim_pos, sim_neg], dim=1) / tau
    return TF.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def _dcl_one_way(z1, z2, tau, weight_fn=None):
    z1, z2 = _unit(z1), _unit(z2)
    n = z1.shape[0]
    cross = z1 @ z2.T
    positive = -torch.diag(cross) / tau
    if weight_fn is not None:
        positive = positive * weight_fn(z1, z2)
    negatives = torch.cat([z1 @ z1.T, cross], dim=1) / tau
    mask = torch.eye(n, dtype=negatives.dtype).repeat(1, 2)
    return (positive + torch.logsumexp(negatives + mask * math.log(1e-45), dim=1)).mean()


def _lightly_dclw_weights(z1, z2, sigma=0.5):
    similarity = (z1.detach() * z2.detach()).sum(dim=1) / sigma
    return 2 - z1.shape[0] * torch.softmax(similarity, dim=0)


def _moco_queue_loop(z, labels, queue, tau, decoupled=False, in_batch=True):
    """(loss) InfoNCE with extra negatives by explicit loops over anchors and candidates."""
    n = len(z)
    unit = [[v / max(math.sqrt(sum(w * w for w in row)), 1e-12) for v in row] for row in z]
    qunit = [[v / max(math.sqrt(sum(w * w for w in row)), 1e-12) for v in row] for row in queue]
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    total, anchors = 0.0, 0
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        den = [j for j in range(n) if j != i and (in_batch and not (decoupled and j in pos) or (not in_batch and not decoupled and j in pos))]
        terms = [dot(unit[i], unit[j]) / tau for j in den] + [dot(unit[i], q) / tau for q in qunit]
        if not pos or not terms:
            continue
        lse = math.log(sum(math.exp(t) for t in terms))
        total += lse - sum(dot(unit[i], unit[p]) / tau for p in pos) / len(pos)
        anchors += 1
    return total / anchors if anchors else 0.0


@pytest.mark.parametrize("seed,n,k,scale", [(60, 1, 3, 14.3), (61, 5, 4, 1 / 0.07), (62, 9, 2, 100.0)])
def test_clip_is_open_clip_clip_loss(seed, n, k, scale):
    g = _gen(seed)
    a, b = _randn(g, n, k).requires_grad_(), _randn(g, n, k).requires_grad_()
    ours = ref.clip_loss(a, b, scale)
    theirs = _open_clip_clip_loss(_unit(a), _unit(b), scale)
    _close(ours, float(theirs.detach()))
    ga, gb = torch.autograd.grad(ours, (a, b))
    ta, tb = torch.autograd.grad(theirs, (a, b))
    torch.testing.assert_close(ga, ta, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gb, tb, atol=1e-12, rtol=1e-10)
    # normalize=False uses the features as given, exactly open_clip's convention
    ua, ub = _unit(a.detach()), _unit(b.detach())
    _close(ref.clip_loss(ua, ub, scale, normalize=False), float(_open_clip_clip_loss(ua, ub, scale)))


def test_clip_with_labels_is_l_out_both_ways():
    # labels [0, 0, 1]: a_0 and a_1 have positives {b_0, b_1}, a_2 has {b_2}; column-wise the same.
    g = _gen(63)
    a, b = _randn(g, 3, 4), _randn(g, 3, 4)
    labels = torch.tensor([0, 0, 1])
    t = 3.0
    logits = t * _unit(a) @ _unit(b).T
    pos = [[0, 1], [0, 1], [2]]

    def ce(rows):
        return sum(torch.logsumexp(rows[i], 0) - sum(rows[i][p] for p in pos[i]) / len(pos[i]) for i in range(3)) / 3

    _close(ref.clip_loss(a, b, t, labels=labels), float(0.5 * (ce(logits) + ce(logits.T))))
    # unique labels reproduce the label-free loss
    _close(ref.clip_loss(a, b, t, labels=torch.tensor([5, 2, 9])), float(ref.clip_loss(a, b, t)))


@pytest.mark.parametrize("seed,n,k,scale,bias", [(64, 1, 3, 10.0, -10.0), (65, 6, 5, 10.0, -10.0), (66, 7, 2, 2.5, 0.3)])
def test_siglip_is_open_clip_siglip_loss(seed, n, k, scale, bias):
    g = _gen(seed)
    a, b = _randn(g, n, k).requires_grad_(), _randn(g, n, k).requires_grad_()
    ours = ref.siglip_loss(a, b, scale, bias)
    theirs = _open_clip_siglip_loss(_unit(a), _unit(b), scale, bias)
    _close(ours, float(theirs.detach()))
    for got, want in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(theirs, (a, b))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_siglip_with_labels_by_loop():
    g = _gen(67)
    a, b = _randn(g, 4, 3), _randn(g, 4, 3)
    labels = [1, 0, 1, 2]
    t, bias = 4.0, -1.5
    s = (_unit(a) @ _unit(b).T).tolist()
    expected = sum(math.log1p(math.exp(-(1 if labels[i] == labels[j] else -1) * (t * s[i][j] + bias)))
                   for i in range(4) for j in range(4)) / 4
    _close(ref.siglip_loss(a, b, t, bias, labels=torch.tensor(labels)), expected)


def test_siglip_rows_window_and_learnable_scale_bias():
    g = _gen(68)
    a, b = _randn(g, 6, 3), _randn(g, 6, 3)
    t = torch.tensor(7.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    full = ref.siglip_loss(a, b, t, bias)
    parts = torch.cat([ref.siglip_rows(a[s:e], b, t, bias, row_offset=s) for s, e in [(0, 2), (2, 6)]])
    _close(parts.sum() / 6, float(full.detach()))
    assert torch.autograd.gradcheck(lambda ts, bs: ref.siglip_loss(a, b, ts, bs), (t, bias))


@pytest.mark.parametrize("seed,n,m,tau", [(70, 1, 3, 0.2), (71, 5, 1, 0.07), (72, 6, 9, 0.5)])
def test_memory_bank_nt_xent_is_lightly_and_moco(seed, n, m, tau):
    g = _gen(seed)
    a, b, bank = _randn(g, n, 4), _randn(g, n, 4), _randn(g, m, 4)
    ours = ref.nt_xent_loss(a, b, temperature=tau, negatives=bank, in_batch_negatives=False)
    _close(ours, float(_lightly_memory_bank_nt_xent(a, b, bank, tau)))


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("in_batch", [True, False])
def test_info_nce_with_queue_matches_loops(decoupled, in_batch):
    g = _gen(73)
    labels = [0, 1, 0, 2, 2, 2, 3]
    z, queue = _randn(g, 7, 3), _randn(g, 4, 3)
    expected = _moco_queue_loop(z.tolist(), labels, queue.tolist(), 0.3, decoupled=decoupled, in_batch=in_batch)
    got = ref.info_nce_loss(z, labels=torch.tensor(labels), temperature=0.3, negatives=queue,
                            in_batch_negatives=in_batch, decoupled=decoupled)
    _close(got, expected)


@pytest.mark.parametrize("seed,n,tau", [(74, 2, 0.1), (75, 6, 0.5), (76, 9, 0.2)])
def test_decoupled_nt_xent_is_published_dcl(seed, n, tau):
    g = _gen(seed)
    a, b = _randn(g, n, 5).requires_grad_(), _randn(g, n, 5).requires_grad_()
    ours = ref.nt_xent_loss(a, b, temperature=tau, decoupled=True)
    theirs = 0.5 * (_dcl_one_way(a, b, tau) + _dcl_one_way(b, a, tau))
    _close(ours, float(theirs.detach()))
    for got, want in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(theirs, (a, b))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    weighted = ref.nt_xent_loss(a, b, temperature=tau, decoupled="weighted")
    theirs_w = 0.5 * (_dcl_one_way(a, b, tau, _lightly_dclw_weights) + _dcl_one_way(b, a, tau, _lightly_dclw_weights))
    _close(weighted, float(theirs_w.detach()))
    for got, want in zip(torch.autograd.grad(weighted, (a, b)), torch.autograd.grad(theirs_w, (a, b))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_decoupled_anchor_without_candidates_leaves_the_mean():
    # labels [0, 0, 0]: every in-batch row is a positive; decoupled with no extra negatives
    # leaves no candidate, so no anchor counts and the loss is 0 with zero gradient.
    z = _randn(_gen(77), 3, 2).requires_grad_()
    loss = ref.info_nce_loss(z, labels=torch.tensor([0, 0, 0]), decoupled=True)
    assert float(loss) == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    # one extra negative brings every anchor back: ℓ_i = s_iq/τ − mean_p s_ip/τ
    q = _randn(_gen(78), 1, 2)
    u, uq = _unit(z.detach()), _unit(q)
    expected = sum(float(u[i] @ uq[0] / 0.1 - sum(u[i] @ u[p] for p in range(3) if p != i) / 2 / 0.1) for i in range(3)) / 3
    _close(ref.info_nce_loss(z.detach(), labels=torch.tensor([0, 0, 0]), decoupled=True, negatives=q), expected)


def test_tensor_temperature_gradient():
    g = _gen(79)
    z = _randn(g, 6, 3)
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda t: ref.info_nce_loss(z, labels=labels, temperature=t, negatives=z[:2] + 1), (tau,))
    assert torch.autograd.gradcheck(lambda t: ref.clip_loss(z[:3], z[3:], t), (tau,))


# ----------------------------------------------------------------------------- matrix log


def test_matrix_log_of_diagonal_is_elementwise():
    d = [0.6, 0.9, 1.3, 1.45]
    q = torch.diag(torch.tensor(d, dtype=F64))
    exact = ref.matrix_log(q, method="eigh")
    assert torch.allclose(exact, torch.diag(torch.tensor([math.log(v) for v in d], dtype=F64)),
                          rtol=0, atol=1e-14)
    for order in (1, 2, 4, 7):
        series = ref.matrix_log(q, order=order)
        # scalar series Σ_{k≤order} (-1)^{k+1} (d - 1)^k / k on each diagonal entry
        want = [sum((-1) ** (k + 1) * (v - 1) ** k / k for k in range(1, order + 1)) for v in d]
        assert torch.allclose(series, torch.diag(torch.tensor(want, dtype=F64)),
                              rtol=0, atol=1e-15)


def test_matrix_log_order_4_by_hand():
    # Q = [[1, 0.5], [0, 1]]: X = Q - I is nilpotent (X² = 0), so every order ≥ 1 gives
    # log Q = X exactly: [[0, 0.5], [0, 0]].
    q = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64)
    assert torch.equal(ref.matrix_log(q), torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=F64))


def test_matrix_log_taylor_matches_loop_series():
    g = _gen(60)
    q = torch.eye(4, dtype=F64) + 0.3 * _randn(g, 4, 4)    # not symmetric on purpose
    for order in (1, 3, 4, 6):
        want = torch.tensor(_series_log_loop(q.tolist(), order), dtype=F64)
        assert torch.allclose(ref.matrix_log(q, order=order), want, rtol=0, atol=1e-14)


def test_matrix_log_eigh_inverts_matrix_exp():
    g = _gen(61)
    a = _randn(g, 5, 5)
    q = a @ a.T / 5 + 0.5 * torch.eye(5, dtype=F64)                # SPD
    log_q = ref.matrix_log(q, method="eigh")
    assert torch.allclose(log_q, log_q.T, rtol=0, atol=1e-13)
    assert torch.allclose(torch.linalg.matrix_exp(log_q), q, rtol=0, atol=1e-12)
    # A non-symmetric input is read as its symmetric part (Q + Qᵀ)/2.
    skew = _randn(g, 5, 5)
    skew = 0.1 * (skew - skew.T)
    assert torch.allclose(ref.matrix_log(q + skew, method="eigh"), log_q, rtol=0, atol=1e-13)


def test_matrix_log_series_converges_to_exact():
    g = _gen(62)
    a = _randn(g, 5, 5)
    x = a + a.T
    rho = 0.6
    x = rho * x / torch.linalg.matrix_norm(x, ord=2)      # symmetric, spectral radius 0.6
    q = torch.eye(5, dtype=F64) + x
    exact = ref.matrix_log(q, method="eigh")
    errors = []
    for order in (1, 2, 4, 8, 16, 32, 64):
        err = float(torch.linalg.matrix_norm(ref.matrix_log(q, order=order) - exact, ord=2))
        # tail of the scalar series: |Σ_{k>n} (-1)^{k+1} λ^k / k| <= ρ^{n+1} / ((n+1)(1-ρ))
        assert err <= rho ** (order + 1) / ((order + 1) * (1 - rho)) + 1e-14
        errors.append(err)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-14


def test_matrix_log_batched():
    g = _gen(63)
    a = _randn(g, 3, 4, 4)
    q = a @ a.transpose(-2, -1) / 8 + torch.eye(4, dtype=F64)
    for method in ("taylor", "eigh"):
        batched = ref.matrix_log(q, order=5, method=method)
        for i in range(3):
            assert torch.allclose(batched[i], ref.matrix_log(q[i], order=5, method=method),
                                  rtol=0, atol=1e-13)


def test_matrix_log_unknown_method():
    with pytest.raises(ValueError):
        ref.matrix_log(torch.eye(2, dtype=F64), method="pade")


# ----------------------------------------------------------------------------- MCE


def test_matrix_cross_entropy_hand_cases():
    # P = diag(1, 2), Q = diag(e, 1), exact log: log Q = diag(1, 0);
    # tr(P log Q) = 1·1 + 2·0 = 1, tr(Q) = e + 1, MCE = -1 + e + 1 = e.
    p = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    q = torch.diag(torch.tensor([math.e, 1.0], dtype=F64))
    _close(ref.matrix_cross_entropy(p, q, method="eigh"), math.e)
    # P = diag(2, 1), Q = diag(1.5, 1), series of order 2: log 1.5 ≈ 0.5 - 0.5²/2 = 0.375,
    # log 1 = 0; MCE = -(2·0.375) + (1.5 + 1) = 1.75. The +tr(Q) term is in there.
    p = torch.diag(torch.tensor([2.0, 1.0], dtype=F64))
    q = torch.diag(torch.tensor([1.5, 1.0], dtype=F64))
    _close(ref.matrix_cross_entropy(p, q, order=2), 1.75)


def test_matrix_cross_entropy_matches_loops():
    g = _gen(70)
    k = 4
    a, b = _randn(g, 6, k), _randn(g, 6, k)
    p = a.T @ a / 6
    q = b.T @ b / 24 + 0.8 * torch.eye(k, dtype=F64)
    log_q = _series_log_loop(q.tolist(), 4)
    pl, ql = p.tolist(), q.tolist()
    want = (-sum(pl[i][j] * log_q[j][i] for i in range(k) for j in range(k))
            + sum(ql[i][i] for i in range(k)))
    _close(ref.matrix_cross_entropy(p, q), want)


# ----------------------------------------------------------------------------- Matrix-SSL


@pytest.mark.parametrize("seed,n,k", [(80, 2, 1), (81, 5, 3), (82, 9, 5)])
def test_matrix_ssl_matches_loops(seed, n, k):
    g = _gen(seed)
    p, z = _randn(g, n, k), _randn(g, n, k)
    for params in [(1.0, 1.0, 1.0, 4), (0.5, 0.5, 0.003, 4), (1.3, 0.9, 2.0, 2)]:
        lambd, mu, gamma, order = params
        want = _matrix_ssl_loop(p.tolist(), z.tolist(), *params)
        _close(ref.matrix_ssl_loss(p, z, lambd=lambd, mu=mu, gamma=gamma, order=order), want)
        _close(ref.released_matrix_ssl_loss(p, z, lambd=lambd, mu=mu, gamma=gamma,
                                            order=order), want)


def test_matrix_ssl_uniformity_is_minus_log_det_at_high_order():
    # -tr(λ I log Q) = -λ log det Q for any Q whose series converges; γ = 0 isolates U.
    g = _gen(83)
    n, k = 8, 4
    p, z = _randn(g, n, k), _randn(g, n, k)
    pn = p / p.norm(dim=1, keepdim=True)
    zn = z / z.norm(dim=1, keepdim=True)
    q = (pn - pn.mean(0)).T @ (zn - zn.mean(0)) / n + torch.eye(k, dtype=F64)
    _, logabsdet = torch.linalg.slogdet(q)
    got = ref.matrix_ssl_loss(p, z, lambd=0.7, gamma=0.0, order=80)
    _close(got, -0.7 * float(logabsdet), tol=1e-12)


def test_matrix_ssl_rows_are_normalised():
    g = _gen(84)
    p, z = _randn(g, 6, 3), _randn(g, 6, 3)
    scale = torch.rand(6, 1, generator=g, dtype=F64) * 5 + 0.1
    _close(ref.matrix_ssl_loss(p * scale, z / scale), float(ref.matrix_ssl_loss(p, z)))


# ----------------------------------------------------------------------------- gradients, dtypes


def _gradcheck_cases():
    g = _gen(90)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])      # anchor 5 is lone
    q_base = _randn(g, 4, 4)
    q_base = q_base @ q_base.T / 4 + torch.eye(4, dtype=F64)
    p_mat = _randn(g, 4, 4)
    return [
        ("vicreg", lambda a, b: ref.vicreg_loss(a, b), (_spread(g, 5, 3), _spread(g, 5, 3))),
        ("vicreg_relation", lambda z: ref.vicreg_relation_loss(z, labels=labels),
         (_spread(g, 6, 3),)),
        ("barlow", lambda a, b: ref.barlow_twins_loss(a, b, lambd=0.1),
         (_randn(g, 5, 3), _randn(g, 5, 3))),
        ("info_nce", lambda z: ref.info_nce_loss(z, labels=labels, temperature=0.5),
         (_randn(g, 6, 3),)),
        ("nt_xent", lambda a, b: ref.nt_xent_loss(a, b), (_randn(g, 3, 4), _randn(g, 3, 4))),
        ("matrix_ssl", lambda p, z: ref.matrix_ssl_loss(p, z), (_randn(g, 6, 3), _randn(g, 6, 3))),
        ("released_matrix_ssl", lambda p, z: ref.released_matrix_ssl_loss(p, z, gamma=0.5),
         (_randn(g, 5, 3), _randn(g, 5, 3))),
        ("mce_eigh", lambda p, q: ref.matrix_cross_entropy(p, q, method="eigh"),
         (p_mat, q_base)),
    ]


@pytest.mark.parametrize("case", _gradcheck_cases(), ids=lambda c: c[0])
def test_gradcheck_float64(case):
    _, fn, inputs = case
    inputs = tuple(t.clone().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def _all_losses():
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    return [
        lambda a, b: ref.vicreg_loss(a, b),
        lambda a, b: ref.vicreg_relation_loss(a, labels=labels),
        lambda a, b: ref.barlow_twins_loss(a, b),
        lambda a, b: ref.info_nce_loss(a, labels=labels),
        lambda a, b: ref.nt_xent_loss(a, b),
        lambda a, b: ref.matrix_ssl_loss(a, b),
        lambda a, b: ref.released_matrix_ssl_loss(a, b),
    ]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-1)])
def test_losses_compute_in_the_input_dtype(dtype, tol):
    g = _gen(91)
    a, b = _randn(g, 6, 4), _randn(g, 6, 4)
    for fn in _all_losses():
        exact = fn(a, b)
        low = fn(a.to(dtype), b.to(dtype))
        assert exact.dtype == F64
        assert low.dtype == dtype, low.dtype
        assert math.isclose(float(low), float(exact), rel_tol=tol, abs_tol=tol)
    _, count = ref.info_nce_rows(a.to(dtype), labels=torch.tensor([0, 1, 0, 1, 2, 2]))
    assert count.dtype == torch.float32
