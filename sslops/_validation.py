"""Input policy (conventions §6): bad input raises ``ValueError``/``TypeError`` naming the argument.

Every check here reads only metadata (shape, dtype, device) except :func:`check_pairs`,
which reads the index range once per call (the CSR build needs the sizes anyway; under
``torch.compile`` the range is checked inside the graph instead and out-of-range pairs give
a NaN loss, since a compiled graph cannot raise on tensor values), and
:func:`check_finite`, which runs only under ``sslops.set_debug(True)``: on the hot path a
non-finite input shows up as a NaN loss, never as a silently wrong number.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_DEBUG = False


def set_debug(enabled: bool = True) -> None:
    """Turn eager input checks on or off (off by default).

    With debug on, every loss checks its floating inputs for NaN/Inf before computing
    and raises ``ValueError`` naming the argument. This costs a host synchronisation per
    input, so keep it off in training; without it a non-finite input gives a NaN loss.
    """
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_enabled() -> bool:
    return _DEBUG


def check_embedding(name, z, *, min_rows=1, why_rows=""):
    """``z`` must be a 2-D floating tensor (N, K) with N >= ``min_rows`` and K >= 1."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name} must have shape (N, K) (2-D), got a {z.dim()}-D tensor of shape {tuple(z.shape)}")
    n, k = z.shape
    if k < 1:
        raise ValueError(f"{name} must have at least one feature column, got shape {tuple(z.shape)}")
    if n < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row{'s' if min_rows != 1 else ''}{why_rows}, got N = {n}")
    check_finite(name, z)


def check_square(name, m):
    """``m`` must be a floating (K, K) matrix."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {m.dtype}")
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"{name} must be a square (K, K) matrix with K >= 1, got shape {tuple(m.shape)}")
    check_finite(name, m)


def check_same_layout(name_a, a, name_b, b, *, same_rows=True):
    """``a`` and ``b`` must agree in dtype, device and shape (or only K when ``same_rows`` is False)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if same_rows and a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not same_rows and a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of features, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_relation(n, device, labels, pairs):
    """Exactly one of ``labels`` (N,) integers or ``pairs`` (2, P) int64 (or int32) indices in [0, N)."""
    if (labels is None) == (pairs is None):
        raise ValueError("give exactly one of labels (N,) or pairs (2, P); got " + ("both" if labels is not None else "neither"))
    if labels is not None:
        check_labels(labels, n, device)
    else:
        check_pairs(pairs, n, device)


def check_labels(labels, n, device):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of integers, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) (one label per row of z), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as z ({device}), got {labels.device}")


def check_pairs(pairs, n, device, *, check_range=True):
    """(2, P) integer indices on ``device``; with ``check_range``, all in [0, n) (one host sync)."""
    if not isinstance(pairs, torch.Tensor):
        raise TypeError(f"pairs must be a (2, P) torch.Tensor of int64 indices, got {type(pairs).__name__}")
    if pairs.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"pairs must have dtype int64 (or int32), got {pairs.dtype}")
    if pairs.dim() != 2 or pairs.shape[0] != 2:
        raise ValueError(f"pairs must have shape (2, P) (row indices, column indices), got {tuple(pairs.shape)}")
    if pairs.device != device:
        raise ValueError(f"pairs must be on the same device as z ({device}), got {pairs.device}")
    if check_range and pairs.numel() and not torch.compiler.is_compiling():
        # (under torch.compile the caller checks in the graph instead: see functional._relation_run)
        lo, hi = torch.stack([pairs.min(), pairs.max()]).tolist()
        if lo < 0:
            raise ValueError(f"pairs must hold indices in [0, {n}), found a negative index {lo}")
        if hi >= n:
            raise ValueError(f"pairs must hold indices in [0, {n}) (N = rows of z), found {hi}")


def check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_hyper(name, value, device, *, positive):
    """A float (finite; > 0 when ``positive``) or a 0-d floating tensor on ``device``.

    A tensor's value is not read on the hot path (a host sync): a non-positive tensor
    temperature or scale gives a NaN loss instead (see ``functional``); under
    ``set_debug(True)`` it is checked here and raises.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a 0-d floating tensor, got a tensor of dtype {value.dtype}")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on the same device as the embeddings ({device}), got {value.device} "
                             "(move the tensor, or the module holding it, with .to(device))")
        if _DEBUG:
            v = float(value.detach())
            if not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {v} "
                                 "(found by sslops.set_debug(True))")
        return
    if positive:
        check_positive(name, value)
    else:
        check_real(name, value)


def check_negatives(negatives, name_z, z):
    """``negatives``: None, or (M, K) rows of z's K, dtype and device (M may be 0)."""
    if negatives is None:
        return
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"negatives must be a torch.Tensor (M, K) or None, got {type(negatives).__name__}")
    if negatives.dim() != 2:
        raise ValueError(f"negatives must have shape (M, K) (2-D), got a {negatives.dim()}-D tensor of shape {tuple(negatives.shape)}")
    if negatives.dtype != z.dtype:
        raise TypeError(f"negatives must have the dtype of {name_z} ({z.dtype}), got {negatives.dtype}")
    if negatives.device != z.device:
        raise ValueError(f"negatives must be on the device of {name_z} ({z.device}), got {negatives.device}")
    if negatives.shape[1] != z.shape[1]:
        raise ValueError(f"negatives must have the {z.shape[1]} features of {name_z} (K), got shape {tuple(negatives.shape)}")
    check_finite("negatives", negatives)


def check_candidates(in_batch_negatives, negatives, decoupled):
    """``in_batch_negatives`` a bool, ``decoupled`` False/True/"weighted"; some negative must remain."""
    if not isinstance(in_batch_negatives, bool):
        raise TypeError(f"in_batch_negatives must be True or False, got {in_batch_negatives!r}")
    if not (decoupled is False or decoupled is True or (isinstance(decoupled, str) and decoupled == "weighted")):
        raise ValueError(f"decoupled must be False, True or 'weighted', got {decoupled!r}")
    if not in_batch_negatives and (negatives is None or negatives.shape[0] == 0):
        raise ValueError("in_batch_negatives=False needs negatives= (M >= 1 rows): without them an anchor's only "
                         "candidates are its own positives")


def check_pair_labels(labels, n, device):
    """CLIP/SigLIP ``labels``: None or (N,) integers, one per pair (a_i, b_i)."""
    if labels is not None:
        check_labels(labels, n, device)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_order(order):
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise TypeError(f"order must be an int >= 1, got {type(order).__name__}")
    if order < 1:
        raise ValueError(f"order must be >= 1 (the number of Taylor terms), got {order}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_finite(name, t):
    """Under ``set_debug(True)`` only: raise if ``t`` holds NaN or Inf (a host sync)."""
    if _DEBUG and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or Inf values (found by sslops.set_debug(True))")
