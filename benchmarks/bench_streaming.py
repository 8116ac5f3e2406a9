"""Streaming and online EM over a DataLoader, whose batches are new tensors at every pass:
seconds per epoch with the step programs (``jit=True``, the default) against the model's
Python at every step (``jit=False``), in the same process.

  * ``fit_batches``: exact EM, one step per pass over the batches;
  * ``OnlineEM``: stepwise EM, one step per batch.

The model is a full-covariance Gaussian mixture (N points, D=4, K=4, float64) in batches of
``--batch`` points. The batches after the first run the first one's plan, and their E-step and
statistics per pass can run as one graph shared by every batch of their shape, the data among
its inputs (:mod:`pyro_em.program`), captured where the capture is repaid: after thousands of
runs, so a fit of a few epochs runs them in Python (as users get it, the default). ``--capture``
captures at once (``CAPTURE_AT_ONCE``), timing the graphs a long fit reaches. The first
epoch, which plans (and captures), is shown apart.

Run:  python benchmarks/bench_streaming.py [--n 10000 --batch 200 --epochs 5] [--capture] [--docs]
"""

import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

from _timing import docs_table
from pyro_em import EM, OnlineEM

K, D = 4, 4


@pyro.infer.config_enumerate
def model(x):
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.linspace(-2.0, 2.0, K).unsqueeze(-1).expand(K, D).clone())
    scale_tril = pyro.param("scale_tril", torch.eye(D).expand(K, D, D).clone(), constraint=constraints.lower_cholesky)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=x)


def data(n):
    g = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(K, D, generator=g)
    return centers[torch.randint(K, (n,), generator=g)] + torch.randn(n, D, generator=g)


def epochs(kind, jit, loader, count):
    """Seconds of the first epoch and the fastest later one, and the final loss."""
    pyro.clear_param_store()
    em = OnlineEM(model, jit=jit, decay=0.7) if kind == "OnlineEM" else EM(model, jit=jit)
    times, loss = [], None
    for _ in range(count):
        t = time.perf_counter()
        loss = em.step_batches(loader)
        times.append(time.perf_counter() - t)
    planner = em._planner  # (the graphs shared by the batches' shapes: none before 2026-12-06)
    held = [*getattr(planner, "_shared_steps", {}).values(),
            *(p for ps in getattr(planner, "_shared_summaries", {}).values() for p in ps.values())] if jit else []
    states = {p.program.state for p in held}
    return times[0], min(times[-3:]), loss, states


def main(n, batch, count):
    torch.set_default_dtype(torch.float64)
    loader = DataLoader(TensorDataset(data(n)), batch_size=batch)
    print(f"Streaming EM over a DataLoader, N={n}, batches of {batch}, full-covariance GMM D={D} K={K}, "
          f"float64, torch threads={torch.get_num_threads()}")
    print(f"{'':14s} {'first epoch jit / Python (s)':>29s} {'epoch jit / Python (s)':>24s} {'ratio':>6s}  graphs")
    for kind in ("fit_batches", "OnlineEM"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f1, t1, l1, states = epochs(kind, True, loader, count)
            f0, t0, l0, _ = epochs(kind, False, loader, count)
        assert abs(l1 - l0) <= 1e-9 * abs(l0), (l1, l0)
        print(f"{kind:14s} {f1:14.3f} / {f0:6.3f} {t1:17.3f} / {t0:6.3f} {t1 / t0:6.2f}  {','.join(sorted(states))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="data points")
    parser.add_argument("--batch", type=int, default=200, help="points per batch")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per fit (the fastest of the last three is kept)")
    parser.add_argument("--capture", action="store_true", help="capture the step programs at once")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    if args.capture:
        import pyro_em.program

        pyro_em.program.CAPTURE_AT_ONCE = True
    with docs_table("bench_streaming" + ("_captured" if args.capture else ""), args.docs):
        main(args.n, args.batch, args.epochs)
