"""Time EM on a full-covariance Gaussian mixture written in Pyro, against the peers, in one process.

Prints seconds per EM iteration and ratios, all from the same data and starting point:
  * pyro_em's E-step (log Z and every posterior marginal) against Pyro's own
    ``TraceEnum_ELBO.loss_and_grads`` on the same model with an empty guide;
  * a steady-state pyro_em EM step (closed-form M-step, plan made) against one iteration of
    scikit-learn's ``GaussianMixture`` (``reg_covar=0``) and, if installed, pomegranate's
    ``GeneralMixtureModel``, each measured as the difference between fits with ``max_iter=1``
    and ``max_iter=1+m`` so their initialization is not counted.

Also prints the peak memory of an EM step beyond what it starts with, relative to one N x K x D
array (what the E-step inherently touches), measured in a child process.

With ``--diagonal``, a diagonal-covariance mixture against scikit-learn's ``"diag"`` instead.
With ``--compile [MODE]``, the step of ``EM(model, compile=MODE)`` against the default step
(goal: at most 0.6 in float32, the same losses to 1e-5).

Run:  python benchmarks/bench_gmm.py [--n 100000 --d 8 --k 8 --dtype float64 --repeat 5] [--diagonal | --compile]
Needs scikit-learn; pomegranate is timed when installed (``pip install -e ".[bench]"``).
"""

import argparse
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch.distributions import constraints

from _timing import best_time, docs_table, peak_extra_memory
from pyro_em import EM


def make_model(N, D, K, init):
    weights0, locs0, tril0 = init

    @config_enumerate
    def model(data):
        # Clones: Pyro keeps an unconstrained init tensor itself as the param and updates it.
        weights = pyro.param("weights", weights0.clone(), constraint=constraints.simplex)
        locs = pyro.param("locs", locs0.clone())
        scale_tril = pyro.param("scale_tril", tril0.clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=data)

    return model


def pomegranate_iteration(X, init, m, repeat):
    """Seconds per iteration of pomegranate's GeneralMixtureModel (float64), or None."""
    try:
        from pomegranate.distributions import Normal
        from pomegranate.gmm import GeneralMixtureModel
    except ImportError:
        return None
    K = len(init[0])
    covs = (init[2] @ init[2].mT).double()

    def fit(max_iter):
        dists = [Normal(means=init[1][k].double().clone(), covs=covs[k].clone(), covariance_type="full") for k in range(K)]
        GeneralMixtureModel(dists, priors=init[0].double().clone(), max_iter=max_iter, tol=0).fit(X)

    return (best_time(lambda: fit(1 + m), repeat) - best_time(lambda: fit(1), repeat)) / m


def main(N, D, K, dtype, repeat, m=10, memory_only=False):
    torch.manual_seed(0)
    centres = torch.randn(K, D, dtype=dtype) * 4
    data = centres[torch.randint(K, (N,))] + torch.randn(N, D, dtype=dtype)
    init = (
        torch.full((K,), 1.0 / K, dtype=dtype),
        data[torch.randperm(N)[:K]].clone(),
        torch.eye(D, dtype=dtype).expand(K, D, D).clone(),
    )
    model = make_model(N, D, K, init)

    pyro.clear_param_store()
    em = EM(model, max_plate_nesting=1)
    t_estep = best_time(lambda: em.e_step(data), repeat)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    t_elbo = best_time(lambda: elbo.loss_and_grads(model, lambda data: None, data), repeat)

    def em_steps():
        for _ in range(m):
            em.step(data)

    t_em = best_time(em_steps, repeat) / m
    if memory_only:
        nkd = N * K * D * data.element_size()
        print(f"peak extra memory of a pyro_em step: {peak_extra_memory(lambda: em.step(data)) / nkd:.2f} "
              f"x the N*K*D array ({nkd / 2**20:.0f} MiB)")
        return

    from sklearn.mixture import GaussianMixture

    X = data.double().numpy()
    precisions = np.linalg.inv(np.einsum("kij,klj->kil", init[2].double().numpy(), init[2].double().numpy()))

    def sk_fit(max_iter):
        gm = GaussianMixture(
            K, covariance_type="full", max_iter=max_iter, tol=0, reg_covar=0, init_params="random",
            weights_init=init[0].double().numpy(), means_init=init[1].double().numpy(),
            precisions_init=precisions,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(X)

    t_sk = (best_time(lambda: sk_fit(1 + m), repeat) - best_time(lambda: sk_fit(1), repeat)) / m
    t_pg = pomegranate_iteration(data.double(), init, m, repeat)

    print(f"GMM full covariance, N={N} D={D} K={K}, pyro_em in {str(dtype)[6:]}, scikit-learn in "
          f"float64, torch threads={torch.get_num_threads()}")
    print(f"{'':36s} {'s/iter':>8s} {'ratio':>7s}")
    print(f"{'pyro_em E-step':36s} {t_estep:8.4f}")
    print(f"{'Pyro TraceEnum_ELBO.loss_and_grads':36s} {t_elbo:8.4f} {t_estep / t_elbo:7.2f}  (E-step / ELBO)")
    print(f"{'scikit-learn GaussianMixture':36s} {t_sk:8.4f}")
    if t_pg is not None:
        print(f"{'pomegranate GeneralMixtureModel':36s} {t_pg:8.4f}")
    print(f"{'pyro_em EM step':36s} {t_em:8.4f} {t_em / t_sk:7.2f}  (pyro_em / scikit-learn)")
    if t_pg is not None:
        print(f"{'':36s} {'':8s} {t_em / t_pg:7.2f}  (pyro_em / pomegranate)")
    # Memory in a child process where large blocks are mmap-ed, so freed memory leaves the RSS.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    argv = [sys.executable, __file__, "--n", str(N), "--d", str(D), "--k", str(K),
            "--dtype", str(dtype)[6:], "--repeat", "1", "--memory"]
    print(subprocess.run(argv, env=env, capture_output=True, text=True).stdout.strip())
    print("M-step plan:\n  " + str(em.plan).replace("\n", "\n  "))


def diagonal(N, D, K, dtype, repeat, m=10):
    """Seconds per iteration of a diagonal-covariance mixture (``Normal(locs[z], scales[z])
    .to_event(1)``) against scikit-learn's ``covariance_type="diag"``."""
    torch.manual_seed(0)
    data = (torch.randn(K, D, dtype=torch.float64) * 4)[torch.randint(K, (N,))] + torch.randn(N, D, dtype=torch.float64)
    locs0 = data[torch.randperm(N)[:K]].clone()

    @config_enumerate
    def model(x):
        weights = pyro.param("weights", torch.full((K,), 1.0 / K, dtype=dtype), constraint=constraints.simplex)
        locs = pyro.param("locs", locs0.to(dtype).clone())
        scales = pyro.param("scales", torch.ones(K, D, dtype=dtype), constraint=constraints.positive)
        with pyro.plate("data", N):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

    pyro.clear_param_store()
    em = EM(model, max_plate_nesting=1)
    x = data.to(dtype)
    t_em = best_time(lambda: em.step(x), repeat)
    from sklearn.mixture import GaussianMixture

    def sk_fit(max_iter):
        gm = GaussianMixture(K, covariance_type="diag", max_iter=max_iter, tol=0, reg_covar=0, init_params="random",
                             weights_init=np.full(K, 1.0 / K), means_init=locs0.numpy(), precisions_init=np.ones((K, D)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(data.numpy())

    t_sk = (best_time(lambda: sk_fit(1 + m), repeat) - best_time(lambda: sk_fit(1), repeat)) / m
    print(f"GMM diagonal covariance, N={N} D={D} K={K}, pyro_em in {str(dtype)[6:]}, scikit-learn in float64")
    print(f"{'scikit-learn GaussianMixture diag':36s} {t_sk:8.4f}")
    print(f"{'pyro_em EM step':36s} {t_em:8.4f} {t_em / t_sk:7.2f}  (pyro_em / scikit-learn)")


def compiled(N, D, K, dtype, repeat, mode, m=5):
    """Seconds per step of the full-covariance mixture with ``EM(model, compile=mode)`` against
    the default step (the captured graph run as it is), from the same start, and the largest
    relative difference of their losses over ``m`` steps."""
    torch.manual_seed(0)
    centres = torch.randn(K, D, dtype=dtype) * 4
    data = centres[torch.randint(K, (N,))] + torch.randn(N, D, dtype=dtype)
    init = (torch.full((K,), 1.0 / K, dtype=dtype), data[torch.randperm(N)[:K]].clone(),
            torch.eye(D, dtype=dtype).expand(K, D, D).clone())
    model = make_model(N, D, K, init)
    times, losses, warm = {}, {}, {}
    for option in (False, mode):
        pyro.clear_param_store()
        em = EM(model, max_plate_nesting=1, compile=option)
        start = time.perf_counter()
        for _ in range(3):  # plan, capture (and compile), check against Python
            em.step(data)
        warm[option] = time.perf_counter() - start
        losses[option] = [em.step(data) for _ in range(m)]
        times[option] = best_time(lambda: em.step(data), repeat)
        status = str(em.plan).splitlines()[-1]
    gap = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[mode]))
    print(f"GMM full covariance, N={N} D={D} K={K}, {str(dtype)[6:]}, torch threads={torch.get_num_threads()}")
    print(f"{'default step (graph module)':36s} {times[False]:8.4f}   first 3 steps {warm[False]:6.2f} s")
    print(f"{f'compile={mode!r} step':36s} {times[mode]:8.4f}   first 3 steps {warm[mode]:6.2f} s")
    print(f"{'ratio compiled / default':36s} {times[mode] / times[False]:8.2f}   losses agree to {gap:.1e} (relative)")
    print(f"  {status}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="only measure peak memory (Linux)")
    parser.add_argument("--diagonal", action="store_true", help="a diagonal-covariance mixture instead")
    parser.add_argument("--compile", nargs="?", const=True, default=None,
                        help="time EM(model, compile=MODE) against the default step (MODE: a torch.compile mode; "
                             "none given: compile=True)")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    variant = " --compile" if args.compile is not None else " --diagonal" if args.diagonal else ""
    with docs_table(f"bench_gmm{variant} {args.dtype}", args.docs and not args.memory):
        if args.compile is not None:
            compiled(args.n, args.d, args.k, getattr(torch, args.dtype), args.repeat, args.compile)
        elif args.diagonal:
            diagonal(args.n, args.d, args.k, getattr(torch, args.dtype), args.repeat)
        else:
            main(args.n, args.d, args.k, getattr(torch, args.dtype), args.repeat, memory_only=args.memory)
