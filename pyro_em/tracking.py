"""Find where parameters enter distributions directly.

For one analysis trace, each param value is replaced by a :class:`Tracked` tensor: the same
values, plus ``ids``, an integer tensor giving for each element the flat index of the param
element it *is*. Pure data-movement ops (indexing by enumerated values as in ``locs[z]``,
``expand``, broadcasting, reshapes) apply the same op to ``ids``; Categorical's row
normalization (``probs / probs.sum(-1, keepdim=True)``, ``logits - logits.logsumexp(-1)``)
keeps them too, and so do ``torch.cat`` and ``torch.where`` mixing a param with constants,
whose elements get id -1 (an identity transition before a chain's first step, padding after
a sequence's end). Any other op returns a plain tensor. So after the trace, a distribution
argument that is still tracked is a param, indexed by latents and broadcast: the case a
closed-form M-step can handle, with ``ids`` saying which param slot each element pools into.
"""

from typing import Dict, Optional, Set

import pyro.distributions as dist
import torch
from pyro.distributions.distribution import COERCIONS
from pyro.distributions.util import broadcast_all, broadcast_shape
from pyro.poutine.messenger import Messenger

# Ops that only move elements around: ids follow by the same op.
_MOVES = {
    torch.Tensor.__getitem__,
    torch.Tensor.expand,
    torch.Tensor.expand_as,
    torch.Tensor.unsqueeze,
    torch.Tensor.squeeze,
    torch.Tensor.reshape,
    torch.Tensor.view,
    torch.Tensor.view_as,
    torch.Tensor.permute,
    torch.Tensor.transpose,
    torch.Tensor.movedim,
    torch.Tensor.contiguous,
    torch.Tensor.clone,
    torch.Tensor.detach,
    torch.broadcast_to,
    torch.Tensor.broadcast_to,
    torch.unsqueeze,
    torch.squeeze,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.movedim,
}
# Elementwise bijections (and softmax over the last dim): ids follow, and the map is recorded so
# that a closed-form update made in the argument's space can be mapped back to the param.
BIJECTIONS = {
    "log": (torch.log, torch.exp),
    "exp": (torch.exp, torch.log),
    "sigmoid": (torch.sigmoid, torch.logit),
    "logit": (torch.logit, torch.sigmoid),
    "sqrt": (torch.sqrt, torch.square),
    "square": (torch.square, torch.sqrt),
    "softmax": (lambda x: x.softmax(-1), torch.log),
    "log_softmax": (lambda x: x.log_softmax(-1), lambda x: x),
}
_ELEMENTWISE = {
    torch.log: "log", torch.Tensor.log: "log",
    torch.exp: "exp", torch.Tensor.exp: "exp",
    torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid",
    torch.logit: "logit", torch.Tensor.logit: "logit",
    torch.sqrt: "sqrt", torch.Tensor.sqrt: "sqrt",
    torch.square: "square", torch.Tensor.square: "square",
}
_LAST_DIM = {
    torch.softmax: "softmax", torch.Tensor.softmax: "softmax", torch.nn.functional.softmax: "softmax",
    torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax",
    torch.nn.functional.log_softmax: "log_softmax",
}


def apply_maps(maps, value: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``value`` through the recorded bijections ``maps`` (param -> argument), or back."""
    for name in reversed(maps) if inverse else maps:
        value = BIJECTIONS[name][1 if inverse else 0](value)
    return value


def _bijection(func, args, kwargs) -> Optional[str]:
    if func in _ELEMENTWISE and len(args) == 1 and not kwargs:
        return _ELEMENTWISE[func]
    if func in (torch.Tensor.__pow__, torch.pow) and len(args) == 2 and isinstance(args[1], (int, float)) and args[1] in (2, 0.5):
        return "square" if args[1] == 2 else "sqrt"
    if func in _LAST_DIM:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim in (-1, args[0].dim() - 1) and kwargs.get("dtype") is None:
            return _LAST_DIM[func]
    return None


_ROW_REDUCTIONS = {torch.Tensor.sum: "sum", torch.sum: "sum", torch.Tensor.logsumexp: "lse", torch.logsumexp: "lse"}
_DIVS = {torch.Tensor.div, torch.Tensor.__truediv__, torch.div}
_SUBS = {torch.Tensor.sub, torch.Tensor.__sub__, torch.sub}


class Tracked(torch.Tensor):
    """A tensor that knows which elements of param ``param_name`` it holds (see module docs).

    ``role`` is ``"value"`` for the param itself (or a rearrangement of it), ``"rowsum"`` /
    ``"rowlse"`` for its sum / logsumexp over the last dim (kept only to recognize row
    normalization), and ``"normalized"`` after dividing by the row sum or subtracting the
    row logsumexp. ``maps`` names the bijections applied on the way (see :data:`BIJECTIONS`),
    as in ``probs.log()`` or ``variance.sqrt()``.
    """

    param_name: str
    ids: torch.Tensor
    role: str
    maps: tuple

    @staticmethod
    def wrap(value: torch.Tensor, name: str, ids: torch.Tensor, role: str = "value", maps: tuple = ()) -> "Tracked":
        out = value.as_subclass(Tracked)
        out.param_name, out.ids, out.role, out.maps = name, ids, role, maps
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Arguments hold tensors at most one level down (torch.cat's list): a shallow map is
        # enough, and much cheaper than a pytree walk on every operation of the model.
        plain_args = tuple(_plain_shallow(a) for a in args)
        plain_kwargs = {k: _plain_shallow(v) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*plain_args, **plain_kwargs)
        return _propagate(func, args, kwargs, out)


def _plain_shallow(x):
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(a) for a in x)
    return _plain(x)


def _plain(x):
    if isinstance(x, Tracked):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    return x


def _joined_ids(parts):
    """ids for a tensor assembled from tracked and constant parts, or None if the tracked parts
    are not all plain rearrangements of one param, or a part that is not tracked depends on a
    param all the same (``1 - p`` in ``torch.cat([p, 1 - p])``). Constant elements get id -1."""
    tracked = [p for p in parts if isinstance(p, Tracked)]
    if not tracked or any(
        p.role != "value" or p.maps != tracked[0].maps or p.param_name != tracked[0].param_name for p in tracked
    ):
        return None
    if any(isinstance(p, torch.Tensor) and not isinstance(p, Tracked) and p.requires_grad for p in parts):
        return None
    device = tracked[0].ids.device
    return tracked[0].param_name, tracked[0].maps, [
        p.ids if isinstance(p, Tracked) else torch.full(torch.as_tensor(p).shape, -1, device=device)
        for p in parts
    ]


def _propagate(func, args, kwargs, out):
    if func in (torch.cat, torch.concat, torch.stack):
        joined = _joined_ids(list(args[0]))
        if joined is None:
            return out
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        ids = [i.expand(torch.as_tensor(p).shape) for i, p in zip(joined[2], args[0])]
        return Tracked.wrap(out, joined[0], (torch.stack if func is torch.stack else torch.cat)(ids, dim), maps=joined[1])
    if func in (torch.where, torch.Tensor.where):
        cond, a, b = (args[0], args[1], args[2]) if func is torch.where else (args[1], args[0], args[2])
        joined = _joined_ids([a, b])
        if joined is None:
            return out
        return Tracked.wrap(out, joined[0], torch.where(_plain(cond), *joined[2]).expand(out.shape), maps=joined[1])
    if func is torch.broadcast_tensors or func is torch.functional.broadcast_tensors:
        return tuple(
            Tracked.wrap(o, a.param_name, a.ids.expand(o.shape), a.role, a.maps) if isinstance(a, Tracked) else o
            for a, o in zip(args, out)
        )
    if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], Tracked):
        return out
    src = args[0]
    if func in _MOVES and src.role in ("value", "normalized"):
        ids_args = (src.ids,) + tuple(_plain(a) for a in args[1:])
        with torch._C.DisableTorchFunctionSubclass():
            ids = func(*ids_args, **{k: _plain_shallow(v) for k, v in kwargs.items()})
        return Tracked.wrap(out, src.param_name, ids, src.role, src.maps)
    bijection = _bijection(func, args, kwargs) if src.role in ("value", "normalized") else None
    if bijection is not None and out.shape == src.shape:
        role = "normalized" if bijection in ("softmax", "log_softmax") else src.role
        return Tracked.wrap(out, src.param_name, src.ids, role, src.maps + (bijection,))
    if func in _ROW_REDUCTIONS and src.role in ("value", "normalized") and _is_last_dim_keepdim(src, args, kwargs):
        return Tracked.wrap(out, src.param_name, src.ids, "row" + _ROW_REDUCTIONS[func], src.maps)
    other = args[1] if len(args) > 1 else None
    if (
        isinstance(other, Tracked)
        and other.param_name == src.param_name
        and src.role in ("value", "normalized")
        and (
            (func in _DIVS and other.role == "rowsum")
            or (func in _SUBS and other.role == "rowlse")
        )
        and out.shape == src.shape
        and other.maps == src.maps
    ):
        return Tracked.wrap(out, src.param_name, src.ids, "normalized", src.maps)
    return out


def _is_last_dim_keepdim(src, args, kwargs) -> bool:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return keepdim and dim in (-1, src.dim() - 1)


class _ArgsKeepingBeta(dist.Beta):
    """A Beta that also keeps its two arguments (torch stacks them into a hidden Dirichlet),
    so that tracked concentrations stay visible to the analysis."""

    def __init__(self, concentration1, concentration0, validate_args=None):
        c1, c0 = broadcast_all(concentration1, concentration0)
        super().__init__(c1, c0, validate_args=validate_args)
        self.__dict__.update(concentration1=c1, concentration0=c0)

    def expand(self, batch_shape, _instance=None):
        c1, c0 = self.__dict__["concentration1"], self.__dict__["concentration0"]
        return _ArgsKeepingBeta(c1.expand(batch_shape), c0.expand(batch_shape), validate_args=False)


def _keep_beta_args(cls, args, kwargs):
    if cls is dist.Beta:
        return _ArgsKeepingBeta(*args, **kwargs)
    return None


class TrackParams(Messenger):
    """Return every ``pyro.param`` value as a :class:`Tracked` tensor (for an analysis trace)."""

    def __enter__(self):
        COERCIONS.append(_keep_beta_args)
        return super().__enter__()

    def __exit__(self, *args):
        COERCIONS.remove(_keep_beta_args)
        return super().__exit__(*args)

    def _pyro_post_param(self, msg) -> None:
        value = msg["value"]
        if isinstance(value, Tracked):
            return
        ids = torch.arange(value.numel(), device=value.device).reshape(value.shape)
        msg["value"] = Tracked.wrap(value, msg["name"], ids)


def broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` by Pyro's pure-Python ``broadcast_shape``: torch's takes ten
    times as long a call, and its first call in a process imports sympy (0.3 s).

    :raises ValueError: if the shapes do not broadcast.
    """
    return torch.Size(broadcast_shape(*shapes))


def expanded(t: torch.Tensor) -> bool:
    """Whether ``t`` repeats itself along some dim by broadcasting (a stride-0 view)."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def compact(t: torch.Tensor) -> torch.Tensor:
    """Drop the broadcast (stride-0) extent of an expanded tensor, keeping its rank: a view
    whose dims have size 1 wherever ``t`` repeats itself by broadcasting."""
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))
    return t[index]


def param_dependencies(tensor: Optional[torch.Tensor], leaves: Dict[torch.Tensor, str], memo: Optional[dict] = None) -> Set[str]:
    """Names of the params (given by their unconstrained leaf tensors) that ``tensor`` depends on,
    found by walking its autograd graph. ``memo`` (a dict kept across calls on one trace)
    remembers each node's answer, so that graph shared by many sites is walked once."""
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return set()
    root = tensor.grad_fn  # read once: a Tracked tensor makes a new alias node each time
    if root is None:
        return {leaves[tensor]} if tensor in leaves else set()
    memo = {} if memo is None else memo
    stack = [(root, None)]
    while stack:  # post-order: a node's answer after its inputs' (listed on the first visit)
        node, inputs = stack.pop()
        if node in memo:
            continue
        if inputs is None:
            inputs = [n for n, _ in node.next_functions if n is not None]
            stack.append((node, inputs))
            stack.extend((n, None) for n in inputs if n not in memo)
            continue
        variable = getattr(node, "variable", None)
        found = {leaves[variable]} if variable is not None and variable in leaves else set()
        for n in inputs:
            found |= memo[n]
        memo[node] = found
    return memo[root]
