"""Time EM per iteration on a GPU against the CPU peers, in one process.

  * a full-covariance Gaussian mixture, N=1,000,000, D=16, K=16: pyro_em on the device against
    scikit-learn's ``GaussianMixture`` (float64, CPU);
  * a categorical HMM as one DiscreteHMM site, 1,000 sequences x 1,000 steps, K=16 states,
    M=16 symbols: pyro_em on the device against hmmlearn (``scaling``, CPU).

pyro_em's time is a steady-state ``EM.step`` (the device synchronized); the peers' is the
difference between fits with 1 and 1 + m iterations, so their initialization is not counted.

Run:  python benchmarks/bench_gpu.py [--device cuda] [--dtype float32] [--repeat 3]
      python benchmarks/bench_gpu.py --quick      (small sizes on the CPU: checks the script)
"""

import argparse
import time
import warnings

import numpy as np
import pyro
import torch

from _timing import best_time, docs_table
from bench_gmm import make_model
from bench_hmm import hmmlearn_iteration, vectorized
from pyro_em import EM


def _synchronized(fn, device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def gmm(N, D, K, device, dtype, repeat, m):
    torch.manual_seed(0)
    centres = torch.randn(K, D, dtype=torch.float64) * 4
    data = centres[torch.randint(K, (N,))] + torch.randn(N, D, dtype=torch.float64)
    init = (torch.full((K,), 1.0 / K, dtype=torch.float64), data[torch.randperm(N)[:K]].clone(),
            torch.eye(D, dtype=torch.float64).expand(K, D, D).clone())
    model = make_model(N, D, K, tuple(t.to(device, dtype) for t in init))
    x = data.to(device, dtype)
    pyro.clear_param_store()
    em = EM(model, max_plate_nesting=1)
    t_em = best_time(_synchronized(lambda: em.step(x), device), repeat)

    from sklearn.mixture import GaussianMixture

    X = data.numpy()
    precisions = np.linalg.inv(init[2].numpy() @ np.swapaxes(init[2].numpy(), -1, -2))

    def sk_fit(max_iter):
        gm = GaussianMixture(K, covariance_type="full", max_iter=max_iter, tol=0, reg_covar=0,
                             init_params="random", weights_init=init[0].numpy(), means_init=init[1].numpy(),
                             precisions_init=precisions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(X)

    # (a difference of two fits: the best of three each, so that noise cannot make it negative)
    t_sk = (best_time(lambda: sk_fit(1 + m), max(repeat, 3)) - best_time(lambda: sk_fit(1), max(repeat, 3))) / m
    return t_em, t_sk


def hmm(S, T, K, M, device, dtype, repeat, m):
    g = torch.Generator().manual_seed(0)

    def simplex(*shape):
        t = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5
        return t / t.sum(-1, keepdim=True)

    init = (simplex(K), simplex(K, K), simplex(K, M))
    X = torch.randint(M, (S, T), generator=g)
    pyro.clear_param_store()
    em = EM(vectorized(*(t.to(device, dtype) for t in init)), m_step="closed_form")
    Xd = X.to(device)
    t_em = best_time(_synchronized(lambda: em.step(Xd), device), repeat)
    t_peer = hmmlearn_iteration(X, init, "scaling", m, max(repeat, 3))
    return t_em, t_peer


def main(device, dtype, repeat, quick):
    if quick:
        sizes = dict(gmm=(20_000, 4, 4), hmm=(20, 200, 4, 5))
    else:
        sizes = dict(gmm=(1_000_000, 16, 16), hmm=(1_000, 1_000, 16, 16))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, torch threads={torch.get_num_threads()}"
    print(f"pyro_em on {name} in {str(dtype)[6:]}; peers on the CPU in float64 ({time.strftime('%Y-%m-%d')})")
    print(f"{'':48s} {'pyro_em s/iter':>14s} {'peer s/iter':>12s} {'ratio':>7s}")
    N, D, K = sizes["gmm"]
    t_em, t_peer = gmm(N, D, K, device, dtype, repeat, m=1 if not quick else 3)
    print(f"{f'GMM full cov. N={N:,} D={D} K={K} vs scikit-learn':48s} {t_em:14.4g} {t_peer:12.4g} {t_em / t_peer:7.4g}")
    S, T, K, M = sizes["hmm"]
    t_em, t_peer = hmm(S, T, K, M, device, dtype, repeat, m=1 if not quick else 3)
    print(f"{f'DiscreteHMM {S:,} x {T:,} K={K} vs hmmlearn scaling':48s} {t_em:14.4g} {t_peer:12.4g} {t_em / t_peer:7.4g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes on the CPU")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick else args.device)
    with docs_table(f"bench_gpu {device.type} {args.dtype}", args.docs):
        main(device, getattr(torch, args.dtype), args.repeat, args.quick)
