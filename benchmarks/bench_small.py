"""Small problems, whole fit against whole fit from the same starts: where Python overhead,
not arithmetic, decides.

  * iris (scikit-learn's copy, 150 x 4), a 3-component full-covariance Gaussian mixture,
    10 starts (k-means++ means, equal weights, unit covariances, ``reg_covar=1e-6``: the same
    for both), against scikit-learn's ``GaussianMixture`` given each start in turn; pyro_em
    runs them as ``fit(n_init=10, init=...)``, which plans and captures once;
  * the 107 annual counts of major earthquakes (Zucchini and MacDonald's Table 1.1), a
    3-state Poisson HMM (``pyro.markov``), against hmmlearn's ``PoissonHMM`` from the same
    start.

Both libraries run to the same tolerance: scikit-learn and hmmlearn stop when the log
likelihood gains less than ``tol`` per datum (scikit-learn) or in total (hmmlearn); pyro_em is
given the relative tolerance that matches at the final loss. Each fit includes pyro_em's
planning (its first step). The ratio is pyro_em's seconds over the peer's; the goal of the
step-program work is at most 1. Float64, CPU.

Run:  python benchmarks/bench_small.py [--repeat 3] [--docs]
"""

import argparse
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

import pyro_em.init
from _timing import docs_table
from pyro_em import EM

EARTHQUAKES = [
    13, 14, 8, 10, 16, 26, 32, 27, 18, 32, 36, 24, 22, 23, 22, 18, 25, 21, 21, 14, 8, 11, 14, 23, 18, 17,
    19, 20, 22, 19, 13, 26, 13, 14, 22, 24, 21, 22, 26, 21, 23, 24, 27, 41, 31, 27, 35, 26, 28, 36, 39, 21,
    17, 22, 17, 19, 15, 34, 10, 15, 22, 18, 15, 20, 15, 22, 19, 16, 30, 27, 29, 23, 20, 16, 21, 21, 25, 16,
    18, 15, 18, 14, 10, 15, 8, 15, 6, 11, 8, 7, 18, 16, 13, 12, 13, 20, 15, 16, 12, 18, 15, 16, 13, 15,
    16, 11, 11,
]


def gmm(data, K=3):
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: data[:K].clone())
    tril = pyro.param("tril", lambda: torch.eye(data.shape[-1]).expand(K, -1, -1).clone(), constraint=constraints.lower_cholesky)
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=tril[z]), obs=data)


def poisson_hmm(counts, K=3):
    start = pyro.param("start", torch.ones(K) / K, constraint=constraints.simplex)
    trans = pyro.param("trans", torch.full((K, K), 0.1 / (K - 1)) + (0.9 - 0.1 / (K - 1)) * torch.eye(K),
                       constraint=constraints.simplex)
    rates = pyro.param("rates", torch.tensor([10.0, 20.0, 30.0]), constraint=constraints.positive)
    z = None
    for t in pyro.markov(range(len(counts))):
        z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]), infer={"enumerate": "parallel"})
        pyro.sample(f"x_{t}", dist.Poisson(rates[z]), obs=counts[t])


def iris(repeat):
    from sklearn.datasets import load_iris
    from sklearn.mixture import GaussianMixture

    X = load_iris().data
    data = torch.tensor(X)
    pyro.set_rng_seed(0)  # (kmeans_plusplus draws from torch's generator)
    starts = [pyro_em.init.kmeans_plusplus(data, 3) for _ in range(10)]
    tol = 1e-6  # per datum

    def peer():
        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for means in starts:
                fit = GaussianMixture(3, covariance_type="full", tol=tol, max_iter=1000, reg_covar=1e-6,
                                      weights_init=np.ones(3) / 3, means_init=means.numpy(),
                                      precisions_init=np.stack([np.eye(4)] * 3)).fit(X)
                best = fit if best is None or fit.lower_bound_ > best.lower_bound_ else best
        return best.lower_bound_ * len(X)

    def ours():  # restarts as a user runs them: one EM, fit(n_init=10), each start by init
        pyro.clear_param_store()
        given = iter(starts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = EM(gmm, reg_covar=1e-6).fit(data, max_iter=1000, tol=tol * len(X) / 200.0, n_init=len(starts),
                                                  init=lambda data: pyro.param("locs", next(given).clone()))
        return -min(result.run_losses)

    return "iris, full-covariance GMM K=3, 10 starts", peer, ours


def earthquakes(repeat):
    from hmmlearn.hmm import PoissonHMM

    X = np.array(EARTHQUAKES).reshape(-1, 1)
    counts = torch.tensor(EARTHQUAKES, dtype=torch.float64)
    K, tol = 3, 1e-6

    def peer():
        model = PoissonHMM(n_components=K, n_iter=1000, tol=tol, init_params="", params="stl")
        model.startprob_ = np.ones(K) / K
        model.transmat_ = np.full((K, K), 0.1 / (K - 1)) + (0.9 - 0.1 / (K - 1)) * np.eye(K)
        model.lambdas_ = np.array([[10.0], [20.0], [30.0]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X)
        return model.score(X)

    def ours():
        pyro.clear_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = EM(poisson_hmm).fit(counts, max_iter=1000, tol=tol / 350.0)
        return -result.loss

    return "earthquake counts, Poisson HMM K=3, T=107", peer, ours


def main(repeat):
    torch.set_default_dtype(torch.float64)
    print(f"Small problems, whole fits, float64, torch threads={torch.get_num_threads()}")
    print(f"{'problem':45s} {'peer (s)':>9s} {'pyro_em (s)':>12s} {'ratio':>6s}   log-likelihood peer / pyro_em")
    for case in (iris, earthquakes):
        name, peer, ours = case(repeat)
        times = {}
        for label, fn in (("peer", peer), ("ours", ours)):
            best, value = np.inf, None
            for _ in range(repeat):
                t = time.perf_counter()
                value = fn()
                best = min(best, time.perf_counter() - t)
            times[label] = (best, value)
        (tp, lp), (to, lo) = times["peer"], times["ours"]
        print(f"{name:45s} {tp:9.3f} {to:12.3f} {to / tp:6.1f}   {lp:.4f} / {lo:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each fit; the fastest is kept")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    with docs_table("bench_small", args.docs):
        main(args.repeat)
