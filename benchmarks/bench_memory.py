"""Peak memory of the first EM step (which traces and plans) and of a later step, in fresh
child processes, for models big enough that memory decides whether they fit:

  * a categorical HMM with K=64 states as one DiscreteHMM site (100 sequences x 1,000 steps);
  * the same HMM written with pyro.markov (fused into a DiscreteHMM after planning);
  * a full-covariance Gaussian mixture, N=2,000,000, D=8, K=8, float32;
  * the same mixture streamed by ``EM.step_batches`` in 20 batches of 100,000.

The goals: the first step costs at most twice a later one, so a model that fits in memory for a
step fits for the first one too; a streamed step costs about one batch's step, not the whole
data's (the data itself, held by the caller, is not counted).

Run:  python benchmarks/bench_memory.py [--sequences 100 --steps 1000 --n 2000000]
"""

import argparse
import os
import subprocess
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from _timing import peak_extra_memory
from pyro_em import EM

K_HMM, M_HMM = 64, 16


def hmm_case(form, S, T):
    g = torch.Generator().manual_seed(0)
    start0 = torch.softmax(torch.randn(K_HMM, generator=g), -1)
    trans0 = torch.softmax(torch.randn(K_HMM, K_HMM, generator=g), -1)
    emit0 = torch.softmax(torch.randn(K_HMM, M_HMM, generator=g), -1)
    X = torch.randint(M_HMM, (S, T), generator=g)

    def vectorized(X):
        start = pyro.param("start", start0.clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", trans0.clone(), constraint=constraints.simplex)
        emit = pyro.param("emit", emit0.clone(), constraint=constraints.simplex)
        steps = torch.cat([torch.eye(K_HMM).log().expand(1, K_HMM, K_HMM), trans.log().expand(T - 1, K_HMM, K_HMM)])
        with pyro.plate("seqs", S):
            pyro.sample("x", dist.DiscreteHMM(start.log(), steps, dist.Categorical(emit)), obs=X)

    def sequential(X):
        start = pyro.param("start", start0.clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", trans0.clone(), constraint=constraints.simplex)
        emit = pyro.param("emit", emit0.clone(), constraint=constraints.simplex)
        with pyro.plate("seqs", S):
            z = None
            for t in pyro.markov(range(T)):
                z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return (vectorized if form == "vectorized" else sequential), (X,)


def gmm_case(N, D=8, K=8):
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g) + 3 * torch.randint(K, (N, 1), generator=g)

    def model(X):
        w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
        locs = pyro.param("locs", X[:K].clone())
        L = pyro.param("L", torch.eye(D).expand(K, D, D).clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(X)):
            z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=X)

    return model, (X,)


def measure(case, size):
    """Child process: print 'first later seconds_later' for one case."""
    if case.startswith("gmm"):
        model, args = gmm_case(size[0])
    else:
        torch.set_default_dtype(torch.float64)
        model, args = hmm_case(case, *size)
    em = EM(model)
    if case == "gmm_batches":
        batches = [(x,) for x in args[0].split(size[0] // size[1])]

        def step():
            em.step_batches(batches)
    else:
        def step():
            em.step(*args)
    first = peak_extra_memory(step)
    step()
    t = time.perf_counter()
    later = peak_extra_memory(step)
    print(first, later, time.perf_counter() - t)


def main(args):
    cases = [
        ("vectorized", (args.sequences, args.steps), f"DiscreteHMM K=64, {args.sequences} x {args.steps}, float64"),
        ("sequential", (args.sequences, args.steps), f"pyro.markov HMM K=64, {args.sequences} x {args.steps}, float64"),
        ("gmm", (args.n,), f"GMM full covariance N={args.n:,} D=8 K=8, float32"),
        ("gmm_batches", (args.n, 20), "  the same GMM, step_batches, 20 batches"),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    print(f"{'model':46s} {'first step':>11s} {'later step':>11s} {'ratio':>6s} {'s/step':>7s}")
    for case, size, label in cases:
        if args.only and case not in args.only:
            continue
        argv = [sys.executable, __file__, "--child", case, *map(str, size)]
        out = subprocess.run(argv, env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"{label:46s} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        first, later, seconds = map(float, out.stdout.split())
        gib = 2.0**30
        print(f"{label:46s} {first / gib:8.2f} GiB {later / gib:8.2f} GiB {first / later:6.2f} {seconds:7.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        measure(sys.argv[2], tuple(int(a) for a in sys.argv[3:]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--sequences", type=int, default=100)
        parser.add_argument("--steps", type=int, default=1000)
        parser.add_argument("--n", type=int, default=2_000_000)
        parser.add_argument("--only", nargs="*", help="cases to run: vectorized sequential gmm gmm_batches")
        main(parser.parse_args())
