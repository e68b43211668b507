r"""Autocast stays outside sslops: every loss computes in fp32 (fp64 for fp64) under any ``torch.autocast``.

The README's dtype convention (accumulation in fp32, an fp32 loss, gradients in the input's
dtype) has to hold inside ``torch.autocast`` blocks too, where training scripts call losses.
Autocast acts on each aten op as it is dispatched, so without help it reaches into the
library: the covariance products of a pure-PyTorch route become fp16/bf16 matmuls (VICReg
at std 300 overflows fp16 to ``inf``; Barlow Twins comes back as a bf16 number), the power
iteration of the convergence guard runs in bf16, and a K×K product inside a C++ kernel
comes back in bf16 where the kernel writes fp32 (a crash). Three things keep it out:

* :func:`disabled` decorates the body of every custom op (``sslops/ops/*``) and the
  convergence guard: the Triton launchers' ``torch.mm`` and the C++ ops called from a body
  run with autocast off, also when the op is called directly or from a compiled graph.
* The C++ kernels exclude the autocast dispatch keys themselves (``csrc/no_autocast.h``), for
  callers of ``torch.ops.sslops.*_cxx``.
* :func:`fp32_loss` decorates every public loss (``sslops/functional.py``): the forward runs
  with autocast off, and so does the backward. The backward needs care: the autograd engine
  runs it with the autocast state of the ``.backward()`` call, so the built-in backward
  formulas of a pure-PyTorch route (the reference, ``method="eigh"``/``"exact"``, the
  ``gather=True`` paths) would multiply in fp16/bf16 when ``.backward()`` is called inside
  the block. Under autocast the loss's graph is therefore built inside one autograd node
  (:class:`_AutocastFreeGraph`) whose backward walks it with autocast off. Outside autocast,
  or without gradients, nothing is wrapped and nothing costs.

Under ``torch.compile`` the forward's autocast-off region is traced into the graph; the graph
node is for eager mode only. torch.compile traces the backward together with the forward, with
the autocast state ``torch._functorch.config.backward_pass_autocast`` names: the kernel routes
are unaffected (their backward ops switch autocast off themselves), but the built-in backward
formulas of a pure-PyTorch route follow the outer autocast under the default of torch <= 2.13,
``"same_as_forward"``. Set it to ``"off"`` for an fp32 backward there too (2026-11-30;
pytorch/pytorch#179804; pytorch/pytorch#177287 makes ``"off"`` the default).

Limitations, under autocast only (outside it the loss is an ordinary autograd graph): the
loss is once-differentiable (``create_graph=True`` raises), and a backward called inside an
autocast block for a loss computed outside one is not covered (compute the loss inside).
"""

import functools

import torch

__all__ = ["disabled", "fp32_loss", "autocast_on"]

_DEVICE_TYPES = ("cpu", "cuda")  # the devices sslops runs on (the reference runs anywhere, but autocast there is these two)


def autocast_on():
    """True when ``torch.autocast`` is enabled for CPU or CUDA tensors in this thread."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def _call_without_autocast(fn, args, kwargs):
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return fn(*args, **kwargs)


def disabled(fn):
    """Decorator: call ``fn`` with autocast off (CPU and CUDA); free when autocast is already off."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not autocast_on():
            return fn(*args, **kwargs)
        return _call_without_autocast(fn, args, kwargs)

    return wrapper


class _AutocastFreeGraph(torch.autograd.Function):
    """One autograd node holding a whole differentiable computation built with autocast off;
    its backward runs the inner graph, again with autocast off.

    ``run(*leaves)`` recomputes the result from the differentiable inputs. The inner graph
    is freed by the first backward; a second backward (``retain_graph=True`` outside)
    rebuilds it from the saved inputs, so repeated backward calls work as without autocast.
    """

    @staticmethod
    def forward(ctx, run, *leaves):
        out, inner = _AutocastFreeGraph._build(run, leaves)
        ctx.run = run
        ctx.graph = (out, inner)
        ctx.save_for_backward(*leaves)
        return out.detach()

    @staticmethod
    def _build(run, leaves):
        inner = tuple(t.detach().requires_grad_() for t in leaves)
        with torch.enable_grad():
            out = _call_without_autocast(run, inner, {})
        return out, inner

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.graph is None:  # a second backward through a retained outer graph
            ctx.graph = _AutocastFreeGraph._build(ctx.run, ctx.saved_tensors)
        out, inner = ctx.graph
        ctx.graph = None  # torch.autograd.grad frees the inner graph's buffers: drop the rest too
        if not out.requires_grad:
            return (None,) + tuple(torch.zeros_like(t) for t in inner)
        grads = _call_without_autocast(torch.autograd.grad, (out, inner, grad), dict(allow_unused=True))
        return (None,) + tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inner, grads))


def _differentiable(value):
    return isinstance(value, torch.Tensor) and value.requires_grad


def _negatives_in_feature_dtype(args, kwargs):
    """Under autocast the features leave the model in the autocast dtype while a queue of
    negatives (a buffer, sslops.nn.NegativeQueue) keeps its own: cast the queue to the features'
    dtype, as autocast casts a product's operands. Outside autocast a mismatch stays an error."""
    neg, z = kwargs.get("negatives"), args[0] if args else None
    if (isinstance(neg, torch.Tensor) and isinstance(z, torch.Tensor) and neg.dtype != z.dtype
            and neg.is_floating_point() and z.is_floating_point()):
        kwargs = dict(kwargs, negatives=neg.to(z.dtype))
    return kwargs


def fp32_loss(fn):
    """Decorator for the public losses: forward and backward with autocast off (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not autocast_on():
            return fn(*args, **kwargs)
        kwargs = _negatives_in_feature_dtype(args, kwargs)
        positional = [i for i, a in enumerate(args) if _differentiable(a)]
        named = [name for name, v in kwargs.items() if _differentiable(v)]
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not (positional or named):
            return _call_without_autocast(fn, args, kwargs)

        def run(*leaves):
            a, kw = list(args), dict(kwargs)
            for slot, t in zip(positional, leaves[:len(positional)]):
                a[slot] = t
            for name, t in zip(named, leaves[len(positional):]):
                kw[name] = t
            return fn(*a, **kw)

        return _AutocastFreeGraph.apply(run, *(args[i] for i in positional), *(kwargs[n] for n in named))

    return wrapper
