"""Data-parallel EM on ``torch.distributed``: every process holds a shard of the data.

EM is map-reduce by nature: the E-step's expected sufficient statistics, the log likelihood
and, for params without a closed form, the expected complete-data objective ``Q`` and its
derivatives add up over the data. When a default process group is initialized (``gloo`` on CPU,
``nccl`` on GPU, e.g. under ``torchrun``), :class:`~pyro_em.EM` sums each of them over the
processes with ``all_reduce`` before it solves, so every process makes the same M-step; the
params are broadcast from rank 0 before each step and after it, so every process holds the same
values. Without a process group these functions do nothing.
"""

from typing import Iterable, Optional

import pyro
import torch
import torch.distributed as dist


def active() -> bool:
    """Whether EM runs data-parallel: a default process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def _device() -> torch.device:
    """Where the group's collectives run: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(tensor: torch.Tensor, error: Optional[BaseException] = None) -> torch.Tensor:
    """``tensor`` summed over the processes (itself without a process group).

    :param error: an exception this process met while computing its part. It still takes part
        in the reduction, so that the others stop too instead of waiting for it forever, and
        then raises ``error``; the others raise a ``RuntimeError`` that points to it.
    """
    if not active():
        if error is not None:
            raise error
        return tensor
    values = torch.zeros_like(tensor) if error is not None else tensor
    flat = torch.cat([values.reshape(-1), values.new_ones(1) * (error is not None)]).to(_device())
    dist.all_reduce(flat)
    if error is not None:
        raise error
    if bool(flat[-1] > 0):
        raise RuntimeError(
            "Another process of the torch.distributed group failed during this EM step (its "
            "error is shown by that process); the param store keeps its values before the step."
        )
    return flat[:-1].reshape(tensor.shape).to(tensor.device)


def check(error: Optional[BaseException]) -> None:
    """Raise ``error`` if this process met it, and a ``RuntimeError`` in every other process
    (see :func:`all_reduce`); nothing if no process failed."""
    if active():
        all_reduce(torch.zeros(1), error)
    elif error is not None:
        raise error


def broadcast_params(names: Iterable[str]) -> None:
    """Give every process rank 0's values of the params ``names`` (unconstrained, in place)."""
    if not active():
        return
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in sorted(names):
            param = store[name].unconstrained()
            value = param.detach().to(_device())
            dist.broadcast(value, src=0)
            param.copy_(value)
