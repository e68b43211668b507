"""Peak memory of the C++ CPU kernels is at most naive PyTorch's on the benchmark's small cases.

The same measurement as ``python -m benchmarks`` (benchmarks/common.py: the profiler's
allocation events during one forward + backward, above the inputs, gradients included), on
the cases where the kernels used to peak above naive: VICReg and Barlow Twins in bf16 at
N = K = 256 (1.84 MB against 1.2 MB: zero gradients materialised for the saved products,
then fp32 N×K buffers where naive works in bf16), matrix cross-entropy at K = 512 (11.5 MB
against 9.4 MB) and Matrix-SSL at N = 1024, K = 512 (30 MB against 22 MB). Counting
allocations is deterministic, so the comparison cannot flake; sizes are the benchmark's.
"""

import pytest
import torch

from benchmarks import bench_barlow_twins, bench_mce, bench_vicreg, common

from .utils import kernel_backends

pytestmark = pytest.mark.skipif("cpu" not in kernel_backends("vicreg", "cpu"), reason="sslops._C is not built")


def _cases():
    vicreg = [c for c in bench_vicreg.cases("cpu", False) if c.name == "vicreg" and c.shape == {"N": 256, "K": 256}]
    barlow = [c for c in bench_barlow_twins.cases("cpu", False) if c.shape == {"N": 256, "K": 256}]
    mce = [c for c in bench_mce.cases("cpu", False) if c.loss == "matrix_cross_entropy"]
    ssl = [bench_mce.mce_case(1024, k) for k in (128, 512)] + [bench_mce.mce_case(1024, 512, both=True)]
    return [pytest.param(c, id=c.title.replace(" ", "-")) for c in vicreg + barlow + mce + ssl]


@pytest.mark.parametrize("case", _cases())
def test_peak_memory_at_most_naive(case):
    device = torch.device("cpu")
    inputs, leaves = common._prepare(case, device)
    peaks = {}
    for name, fn in (("naive", case.naive_fn), ("sslops-cpu", lambda *t: case.sslops_fn(*t, backend="cpu"))):
        _, _, out = common.prepare_provider(fn, inputs, leaves, device, warmup=False)
        peaks[name] = out["peak_mb"]
    assert peaks["sslops-cpu"] > 0
    assert peaks["sslops-cpu"] <= peaks["naive"], peaks
