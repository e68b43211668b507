"""Host synchronisation: the hot path of every loss never waits for the device.

A host sync (``.item()``, ``bool(t)``, ``.tolist()``, a ``torch.tensor([...], device=...)`` of
Python numbers, an op whose output shape depends on tensor values) stalls the CPU until the
GPU catches up, on every step, and is illegal inside a CUDA graph (``torch.cuda.graph``,
``torch.compile(mode="reduce-overhead")``). The sync-free configuration of every loss:
``labels`` rather than ``pairs``, Python-float hyperparameters, ``check="nan"`` (or ``"off"``)
for the matrix losses' convergence guard, ``method="taylor"``, ``set_debug(False)``.

* GPU lane: forward + backward of every loss on every backend under
  ``torch.cuda.set_sync_debug_mode("error")``, and one training step captured in a CUDA graph,
  replayed on new inputs, against eager.
* CPU (default and Triton lanes): the same forward + backward under :class:`SyncDetector`, a
  dispatch mode that sees every aten op (inside sslops' custom ops too) and fails on the ops
  that synchronise on a GPU; positive controls show it catches the options that do sync.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sslops
from tests.utils import DEVICE, randn

N, K, KQ = 37, 29, 13


# ----------------------------------------------------------------------------- the detector


class HostSync(AssertionError):
    pass


def _custom_op_bodies():
    """{"sslops::name": python body} of sslops' torch.library.custom_op ops."""
    from torch._library.custom_ops import OPDEFS

    return {name: opdef._init_fn for name, opdef in OPDEFS.items() if name.startswith("sslops::")}


class SyncDetector(TorchDispatchMode):
    """Fails on the aten ops that make a GPU run wait for the device, on CPU tensors.

    Flagged: ops tagged ``data_dependent_output`` (``_local_scalar_dense`` behind ``.item()``,
    ``bool()``, ``float()``; ``equal``, ``is_nonzero``), ops tagged ``dynamic_output_shape``
    (``nonzero``, ``unique``, ``masked_select``; indexing with a boolean mask), ``lift_fresh``
    (a tensor made from host data by ``torch.tensor``: a host-to-device copy and a stream sync
    on a GPU), and ``Tensor.tolist``/``Tensor.numpy`` (which read CPU memory without an op).
    sslops' Python custom ops are entered (their bodies run under the detector); the C++ ops
    are leaves (the CUDA C++ sources hold no host read: grep-audited, and the GPU lane checks).
    """

    def __init__(self, patch_numpy=True):
        super().__init__()
        self.bodies = _custom_op_bodies()
        self.patch_numpy = patch_numpy
        self._stack = None

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        mp = self._stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(torch.Tensor, "tolist", _refuse("Tensor.tolist"))
        if self.patch_numpy:
            mp.setattr(torch.Tensor, "numpy", _refuse("Tensor.numpy"))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        body = self.bodies.get(name)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        tags = func.tags
        boolean_index = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
        if torch.Tag.data_dependent_output in tags or func is torch.ops.aten.lift_fresh.default or boolean_index or (
                torch.Tag.dynamic_output_shape in tags and func not in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                                                                        torch.ops.aten.index_put_.default)):
            raise HostSync(f"host synchronisation on the hot path: {func}")
        return func(*args, **kwargs)


def _refuse(what):
    def refuse(self, *args, **kwargs):
        raise HostSync(f"host synchronisation on the hot path: {what}")

    return refuse


# ----------------------------------------------------------------------------- the losses


def _two(device, dtype=torch.float32):
    return [randn(N, K, dtype, device, seed=s).requires_grad_() for s in (1, 2)]


def _labels(device):
    return torch.arange(N, device=device) % 7


def _near_identity(device):
    s = randn(KQ, KQ, torch.float64, seed=5)
    s = s + s.T
    return (torch.eye(KQ, dtype=torch.float64) + 0.4 * s / torch.linalg.matrix_norm(s, ord=2)).float().to(device).requires_grad_()


# name -> (loss for the kernels' registry, make(device) -> leaves, extra(device), run(backend, leaves, extra))
SYNC_FREE = {
    "vicreg": ("vicreg", _two, lambda d: None, lambda b, t, x: sslops.vicreg_loss(*t, sim_coeff=20.0, backend=b)),
    "vicreg_relation": ("vicreg_relation", lambda d: _two(d)[:1], _labels,
                        lambda b, t, x: sslops.vicreg_relation_loss(t[0], labels=x, backend=b)),
    "barlow_twins": ("barlow_twins", _two, lambda d: None, lambda b, t, x: sslops.barlow_twins_loss(*t, lambd=0.005, backend=b)),
    "info_nce": ("info_nce", lambda d: _two(d)[:1], _labels, lambda b, t, x: sslops.info_nce_loss(t[0], labels=x, temperature=0.2, backend=b)),
    "nt_xent": ("nt_xent", _two, lambda d: None, lambda b, t, x: sslops.nt_xent_loss(*t, temperature=0.2, backend=b)),
    # a queue (a buffer: no gradient), DCLW, a learnable temperature (a 0-d tensor leaf)
    "nt_xent_queue": ("nt_xent", lambda d: _two(d) + [torch.tensor(0.2, device=d).requires_grad_()],
                      lambda d: randn(11, K, device=d, seed=7),
                      lambda b, t, x: sslops.nt_xent_loss(t[0], t[1], temperature=t[2], negatives=x, decoupled="weighted",
                                                          backend=b)),
    "clip": ("clip", lambda d: _two(d) + [torch.tensor(14.0, device=d).requires_grad_()], _labels,
             lambda b, t, x: sslops.clip_loss(*t, labels=x, backend=b)),
    "siglip": ("siglip", lambda d: _two(d) + [torch.tensor(10.0, device=d).requires_grad_(),
                                             torch.tensor(-10.0, device=d).requires_grad_()], lambda d: None,
               lambda b, t, x: sslops.siglip_loss(*t, backend=b)),
    "matrix_log": (None, lambda d: [_near_identity(d)], lambda d: None, lambda b, t, x: sslops.matrix_log(t[0], check="nan")),
    "matrix_cross_entropy": ("matrix_cross_entropy", lambda d: [randn(KQ, KQ, device=d, seed=6).requires_grad_(), _near_identity(d)],
                             lambda d: None, lambda b, t, x: sslops.matrix_cross_entropy(*t, check="nan", backend=b)),
    "matrix_ssl": ("matrix_ssl", _two, lambda d: None, lambda b, t, x: sslops.matrix_ssl_loss(*t, check="nan", backend=b)),
}

CPU_PLACES = [("cpu", "reference", ()), ("cpu", "cpu", ()), (DEVICE, "triton", (pytest.mark.triton,))]
GPU_PLACES = [("cuda", "reference", ()), ("cuda", "cuda", ()), ("cuda", "triton", (pytest.mark.triton,))]


def _params(places):
    for name, (loss, *_rest) in SYNC_FREE.items():
        for device, backend, marks in places:
            if loss is None and backend != "reference":
                continue  # matrix_log: one pure-PyTorch route
            yield pytest.param(name, device, backend, marks=marks, id=f"{name}-{device}-{backend}")


def _setup(name, device, backend):
    loss, make, extra, run = SYNC_FREE[name]
    if loss is not None and backend != "reference" and backend not in sslops.kernel_backends(loss, device):
        pytest.skip(f"backend {backend!r} cannot run {loss} here: {sslops.backends()[backend]['reason']}")
    return make(device), extra(device), run


def _step(run, backend, leaves, extra):
    out = run(backend, leaves, extra)
    grad_out = torch.full_like(out, 0.7) if out.dim() == 0 else torch.full_like(out, 0.3)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


# ----------------------------------------------------------------------------- CPU: the dispatch-mode detector


@pytest.mark.parametrize("name,device,backend", list(_params(CPU_PLACES)))
def test_no_host_sync_on_the_hot_path(name, device, backend):
    leaves, extra, run = _setup(name, device, backend)
    want = _step(run, backend, leaves, extra)
    interpreted = device == "cpu" and backend == "triton"  # the Triton interpreter itself copies through numpy
    with SyncDetector(patch_numpy=not interpreted):
        got = _step(run, backend, leaves, extra)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_detector_catches_what_synchronises():
    """Positive controls: each documented synchronising option, and the kinds of host read, are caught."""
    z = randn(N, K).requires_grad_()
    pairs = torch.stack([torch.arange(N - 1), torch.arange(1, N)])
    cases = {
        "pairs (eager range check)": lambda: sslops.info_nce_loss(z, pairs=pairs, backend="reference"),
        "check='raise'": lambda: sslops.matrix_ssl_loss(z, z, backend="reference"),
        "check='warn'": lambda: sslops.matrix_ssl_loss(z, z, backend="reference", check="warn"),
        "item": lambda: z.sum().item(),
        "bool": lambda: bool(z.sum() > 0),
        "torch.tensor": lambda: torch.tensor([1.0, 2.0]) * z[0, :2],
        "boolean mask": lambda: z[z > 0],
        "tolist": lambda: z.detach().tolist(),
    }
    for what, call in cases.items():
        with pytest.raises(HostSync):
            with SyncDetector():
                call()
    sslops.set_debug(True)
    try:
        with pytest.raises(HostSync), SyncDetector():
            sslops.vicreg_loss(z, z.detach() + 1.0, backend="reference")
    finally:
        sslops.set_debug(False)


def test_detector_enters_custom_op_bodies():
    """A host read inside a custom op's Python body is seen (the op is not a black box to the detector)."""
    bodies = _custom_op_bodies()
    assert "sslops::vicreg_bwd" in bodies and "sslops::relation_invariance_fwd" in bodies

    @torch.library.custom_op("sslops_test::reads_host", mutates_args=())
    def reads_host(x: torch.Tensor) -> torch.Tensor:
        return x * float(x.sum())

    reads_host.register_fake(lambda x: torch.empty_like(x))
    from torch._library.custom_ops import OPDEFS

    detector = SyncDetector()
    detector.bodies["sslops_test::reads_host"] = OPDEFS["sslops_test::reads_host"]._init_fn
    with pytest.raises(HostSync), detector:
        reads_host(torch.ones(3))


# ----------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
@pytest.mark.parametrize("name,device,backend", list(_params(GPU_PLACES)))
def test_gpu_no_host_sync(name, device, backend):
    leaves, extra, run = _setup(name, device, backend)
    want = _step(run, backend, leaves, extra)  # warm-up: Triton compiles, cuBLAS handles, allocator pools
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _step(run, backend, leaves, extra)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name,device,backend", list(_params(GPU_PLACES)))
def test_gpu_training_step_in_a_cuda_graph(name, device, backend):
    """A linear projector + the loss, forward and backward, captured once and replayed on new inputs, against eager."""
    leaves, extra, run = _setup(name, device, backend)
    torch.manual_seed(0)
    k = leaves[0].shape[1]
    proj = torch.nn.Linear(k, k, device=device)
    with torch.no_grad():  # near the identity: the matrix losses' series keep converging
        proj.weight.copy_(torch.eye(k, device=device) + 0.02 * randn(k, k, device=device, seed=100))
        proj.bias.mul_(0.01)
    static = [t.detach().clone() for t in leaves]
    params = list(proj.parameters())

    def step(inputs):
        out = run(backend, [proj(t) if t.dim() == 2 else t for t in inputs], extra)  # a 0-d leaf: a learnable temperature / scale
        return (out.detach(), *torch.autograd.grad(out, params, torch.full_like(out, 0.7) if out.dim() == 0 else torch.full_like(out, 0.3)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static)
    for seed in (101, 102):
        fresh = [(t.detach() + 0.01 * randn(*t.reshape(1, -1).shape, t.dtype, device, seed=seed + i).reshape(t.shape))
                 for i, t in enumerate(leaves)]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager = step(fresh)
        for a, b in zip(captured, eager):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
