"""The fused kernels are first-order: a clear error instead of PyTorch's internal one on double backward.

Every op's backward is itself a custom op with no autograd formula (its gradient is a
closed form evaluated by a kernel, not a graph of differentiable PyTorch ops). Autograd
runs a backward with grad mode on exactly when the caller asked for a differentiable
gradient: ``torch.autograd.grad(..., create_graph=True)``, ``loss.backward(create_graph=True)``,
and the ``torch.func`` transforms (``grad``, ``vjp``, ``hessian``, ...), which always build
one. Without this check the second derivative would either fail deep inside PyTorch
("autograd kernel was not registered ...") or, worse, come out silently without the
kernel's contribution. ``backend="reference"`` (plain PyTorch ops) is differentiable to any
order and is the way to get higher derivatives of an sslops loss.
"""

import torch

_MESSAGE = (
    "{loss}: sslops losses are first-order: the fused kernels' backward is not differentiable, "
    "so create_graph=True (double backward, gradient penalties) and torch.func transforms "
    "(torch.func.grad, vjp, hessian) are not supported on this backend. Pass backend='reference' "
    "(plain PyTorch ops, differentiable to any order) for higher derivatives."
)


def first_order_only(loss):
    """Raise ``RuntimeError`` when called inside a backward that builds a graph (create_graph).

    Call it first thing in an autograd registration's backward; ``loss`` names the public
    function the user called.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(_MESSAGE.format(loss=loss))


def no_func_transform(loss):
    """Raise ``RuntimeError`` inside a ``torch.func`` differentiating transform (call before a fused kernel).

    Under ``torch.func.grad`` (and the other transforms) PyTorch refuses the ops' autograd
    registration already in the forward, with a message about ``setup_context`` that says
    nothing to a user of a loss function; this names the limitation and the way out instead.
    Free under ``torch.compile`` (the test folds away while tracing).
    """
    if torch.compiler.is_compiling():
        return
    functorch = torch._C._functorch
    top = functorch.peek_interpreter_stack() if hasattr(functorch, "peek_interpreter_stack") else None
    if top is not None and top.key() in (functorch.TransformType.Grad, functorch.TransformType.Jvp):
        raise RuntimeError(_MESSAGE.format(loss=loss))
