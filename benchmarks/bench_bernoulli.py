"""Time EM on a Bernoulli mixture (scikit-learn's binarized digits, 1797 x 64, K=10), against a
hand-written numpy EM and pomegranate, in one process.

The hand-written EM is what a scikit-learn-style implementation does: log densities as two
matrix products, ``X @ log(p).T + (1 - X) @ log(1 - p).T``, responsibilities by logsumexp,
the M-step as ``R.T @ X``. pyro_em runs the model as a Pyro user writes it. Same data, same
starting point, float64; seconds per EM iteration.

Run:  python benchmarks/bench_bernoulli.py [--k 10 --repeat 5]
"""

import argparse

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from scipy.special import logsumexp
from sklearn.datasets import load_digits
from torch.distributions import constraints

from _timing import best_time, docs_table
from pyro_em import EM


def numpy_em_step(X, w, p):
    """One EM iteration of a Bernoulli mixture, scikit-learn style (float64 numpy)."""
    log_joint = np.log(w) + X @ np.log(p).T + (1 - X) @ np.log1p(-p).T
    log_norm = logsumexp(log_joint, axis=1, keepdims=True)
    R = np.exp(log_joint - log_norm)
    nk = R.sum(0)
    return nk / len(X), np.clip((R.T @ X) / nk[:, None], 1e-12, 1 - 1e-12), -log_norm.sum()


def pomegranate_iteration(X, w0, p0, m, repeat):
    try:
        from pomegranate.distributions import Bernoulli
        from pomegranate.gmm import GeneralMixtureModel
    except ImportError:
        return None

    def fit(max_iter):
        dists = [Bernoulli(probs=torch.as_tensor(p0[k])) for k in range(len(w0))]
        GeneralMixtureModel(dists, priors=torch.as_tensor(w0), max_iter=max_iter, tol=0).fit(torch.as_tensor(X))

    return (best_time(lambda: fit(1 + m), repeat) - best_time(lambda: fit(1), repeat)) / m


def main(K=10, repeat=5, m=10):
    torch.set_default_dtype(torch.float64)
    X = (load_digits().data > 7).astype(np.float64)
    rng = np.random.default_rng(0)
    w0, p0 = np.full(K, 1.0 / K), 0.25 + 0.5 * rng.random((K, X.shape[1]))

    def numpy_steps():
        w, p = w0, p0
        for _ in range(m):
            w, p, _ = numpy_em_step(X, w, p)

    t_np = best_time(numpy_steps, repeat) / m

    Xt = torch.as_tensor(X)

    def model(images):
        weights = pyro.param("weights", torch.as_tensor(w0), constraint=constraints.simplex)
        templates = pyro.param("templates", torch.as_tensor(p0), constraint=constraints.unit_interval)
        with pyro.plate("images", len(images)):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Bernoulli(templates[z]).to_event(1), obs=images)

    pyro.clear_param_store()
    em = EM(model, max_plate_nesting=1)
    em.step(Xt)

    def em_steps():
        for _ in range(m):
            em.step(Xt)

    t_em = best_time(em_steps, repeat) / m
    t_estep = best_time(lambda: em.e_step(Xt), repeat)
    t_pg = pomegranate_iteration(X, w0, p0, m, repeat)

    print(f"Bernoulli mixture, digits {X.shape[0]} x {X.shape[1]}, K={K}, float64, torch threads={torch.get_num_threads()}")
    print(f"{'':36s} {'s/iter':>8s} {'ratio':>7s}")
    print(f"{'hand-written numpy EM':36s} {t_np:8.4f}")
    if t_pg is not None:
        print(f"{'pomegranate GeneralMixtureModel':36s} {t_pg:8.4f}")
    print(f"{'pyro_em E-step':36s} {t_estep:8.4f}")
    print(f"{'pyro_em EM step':36s} {t_em:8.4f} {t_em / t_np:7.2f}  (pyro_em / numpy)")
    if t_pg is not None:
        print(f"{'':36s} {'':8s} {t_em / t_pg:7.2f}  (pyro_em / pomegranate)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    with docs_table("bench_bernoulli", args.docs):
        main(args.k, args.repeat)
