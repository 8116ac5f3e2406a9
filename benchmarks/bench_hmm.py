"""Time Baum-Welch on categorical HMMs written in Pyro against hmmlearn, in one process.

K=8 states, M=16 symbols, float64, the same data and starting point for everyone:
  * vectorized form (one DiscreteHMM site), 50 sequences x 2,000 steps;
  * sequential form (a pyro.markov loop), 20 sequences x 500 and x 1,000 steps.
hmmlearn's time per iteration is the difference between fits with n_iter=1 and n_iter=1+m,
for its default ``implementation="log"`` and for ``"scaling"``; pyro_em's is a steady-state
``EM.step``; its first step (which traces the model and plans) is printed too. Then what
users wait for in a short fit: the first five iterations from a new ``EM`` (planning
included) against hmmlearn ``log``'s ``n_iter=5`` fit, in this warm process and in fresh ones
(``--child``: the seconds from the model's first use to the fit's end, imports excluded,
median of ``--repeat``). Then Pyro's
examples/hmm.py model 1 (Bernoulli tones, MAP priors), fused against the general traced path.

With ``--scan``, times instead the three forward-backward algorithms of ``pyro_em.hmm`` (the
scaled sequential recursions, the same in blocks, and the log-depth parallel one) over a grid
of sizes, the measurements behind ``pyro_em.hmm.choose_algorithm``'s choice on the CPU.

Run:  python benchmarks/bench_hmm.py [--repeat 3] [--scan]
Needs hmmlearn (``pip install -e ".[test]"``).
"""

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
from hmmlearn import hmm
from torch.distributions import constraints

from _timing import best_time, docs_table
from pyro_em import EM

K, M = 8, 16


def vectorized(start0, trans0, emit0):
    K = start0.shape[-1]

    def model(X):
        start = pyro.param("start", start0.log())
        trans = pyro.param("trans", trans0.log())
        emit = pyro.param("emit", emit0.clone(), constraint=constraints.simplex)
        T = X.shape[1]
        # hmmlearn's first state is drawn from start: an identity first transition.
        transitions = torch.cat([torch.eye(K, dtype=X.dtype).log().expand(1, K, K), trans.expand(T - 1, K, K)])
        with pyro.plate("seqs", X.shape[0]):
            pyro.sample("x", dist.DiscreteHMM(start, transitions, dist.Categorical(emit)), obs=X)

    return model


def sequential(start0, trans0, emit0):
    def model(X):
        start = pyro.param("start", start0.clone(), constraint=constraints.simplex)
        trans = pyro.param("trans", trans0.clone(), constraint=constraints.simplex)
        emit = pyro.param("emit", emit0.clone(), constraint=constraints.simplex)
        with pyro.plate("seqs", X.shape[0]):
            z = None
            for t in pyro.markov(range(X.shape[1])):
                z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return model


def hmmlearn_iteration(X, init, implementation, m, repeat):
    S, T = X.shape
    K = len(init[0])
    flat, lengths = X.reshape(-1, 1).numpy(), [T] * S

    def fit(n_iter):
        model = hmm.CategoricalHMM(K, n_iter=n_iter, tol=0, init_params="", params="ste",
                                   implementation=implementation)
        model.startprob_, model.transmat_, model.emissionprob_ = (t.numpy() for t in init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(flat, lengths)

    return (best_time(lambda: fit(1 + m), repeat) - best_time(lambda: fit(1), repeat)) / m


def problems():
    """The three problems' ``(form, model builder, S, T, m, X, init)``, drawn in order."""
    g = torch.Generator().manual_seed(0)

    def simplex(*shape):
        t = torch.rand(*shape, generator=g) + 0.5
        return t / t.sum(-1, keepdim=True)

    init = (simplex(K), simplex(K, K), simplex(K, M))
    out = []
    for form, build, S, T, m in [("vectorized", vectorized, 50, 2000, 5), ("sequential", sequential, 20, 500, 3),
                                 ("sequential", sequential, 20, 1000, 3)]:
        out.append((form, build, S, T, m, torch.randint(M, (S, T), generator=g), init))
    return out


def first_five(case, who):
    """Five iterations from a new fit: pyro_em's ``EM(...).fit`` (planning included) or
    hmmlearn ``log``'s ``n_iter=5``."""
    form, build, S, T, m, X, init = problems()[case]
    if who == "peer":
        model = hmm.CategoricalHMM(K, n_iter=5, tol=0, init_params="", params="ste")
        model.startprob_, model.transmat_, model.emissionprob_ = (t.numpy() for t in init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X.reshape(-1, 1).numpy(), [T] * S)
        return
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        EM(build(*init), m_step="closed_form").fit(X, max_iter=5, tol=0.0)


def child(case, who):
    torch.set_default_dtype(torch.float64)
    t = time.perf_counter()
    first_five(int(case), who)
    print(time.perf_counter() - t)


def fresh(case, who, repeat):
    runs = [float(subprocess.run([sys.executable, __file__, "--child", str(case), who], check=True,
                                 capture_output=True, text=True).stdout.split()[-1]) for _ in range(repeat)]
    return statistics.median(runs)


def main(repeat):
    torch.set_default_dtype(torch.float64)
    print(f"Categorical HMM, K={K} states, M={M} symbols, float64, torch threads={torch.get_num_threads()}")
    print(f"{'':42s} {'s/iter':>8s} {'vs log':>7s} {'vs scaling':>10s}")
    short = []
    for case, (form, build, S, T, m, X, init) in enumerate(problems()):
        pyro.clear_param_store()
        em = EM(build(*init), m_step="closed_form")
        start = time.perf_counter()
        em.step(X)  # plans (and recognizes a pyro.markov chain)
        t_first = time.perf_counter() - start
        t_em = best_time(lambda: em.step(X), repeat)
        t_log = hmmlearn_iteration(X, init, "log", m, repeat)
        t_scaling = hmmlearn_iteration(X, init, "scaling", m, repeat)
        print(f"{'hmmlearn log, ' + f'{S} x {T}':42s} {t_log:8.4f}")
        print(f"{'hmmlearn scaling, ' + f'{S} x {T}':42s} {t_scaling:8.4f}")
        print(f"{'pyro_em ' + form + ', ' + f'{S} x {T}':42s} {t_em:8.4f} {t_em / t_log:7.2f} {t_em / t_scaling:10.2f}"
              f"   first step {t_first:.3f} s")
        warm = [best_time(lambda: first_five(case, who), repeat) for who in ("ours", "peer")]
        cold = [fresh(case, who, repeat) for who in ("ours", "peer")]
        short.append((f"{form}, {S} x {T}", warm, cold))
    print("first 5 iterations from a new fit, pyro_em / hmmlearn log, seconds (ratio):")
    for name, warm, cold in short:
        print(f"{name:42s} warm {warm[0]:.3f}/{warm[1]:.3f} ({warm[0] / warm[1]:4.1f}x)"
              f"   fresh process {cold[0]:.3f}/{cold[1]:.3f} ({cold[0] / cold[1]:4.1f}x)")
    pyro_example(repeat)


def pyro_example(repeat):
    """examples/hmm.py's model 1 as Pyro writes it (tests/pyro_models.py copies it): a tones
    plate under each step, Dirichlet and Beta MAP priors. Steps fused into one DiscreteHMM
    against the general traced path. No peer fits this model."""
    import sys
    from pathlib import Path
    from unittest import mock

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import pyro_models as M

    torch.set_default_dtype(torch.float64)
    seqs, lengths, args = M.polyphonic(num_sequences=100, max_length=100, data_dim=88, hidden_dim=16)
    times = {}
    for fused in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        with contextlib.nullcontext() if fused else mock.patch("pyro_em.planner.fuse_chain", lambda *a: None):
            em = EM(M.hmm_1, map_space="unconstrained", max_plate_nesting=2)
            start = time.perf_counter()
            em.step(seqs, lengths, args)
            first = time.perf_counter() - start
            times[fused] = (best_time(lambda: em.step(seqs, lengths, args), repeat), first)
    print("examples/hmm.py model 1, 100 x 100 x 88 tones, K=16, float64")
    for fused, label in ((True, "fused"), (False, "traced")):
        print(f"{'pyro_em ' + label:42s} {times[fused][0]:8.4f}   first step {times[fused][1]:.3f} s")
    print(f"{'traced / fused':42s} {times[False][0] / times[True][0]:8.1f}")


def scan(repeat):
    """Seconds per forward-backward pass by each algorithm, and what auto chooses."""
    from pyro_em import hmm as H

    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    print(f"forward-backward, float64, CPU, torch threads={torch.get_num_threads()}")
    print(f"{'S':>5s} {'T':>7s} {'K':>3s} " + " ".join(f"{a:>10s}" for a in H.ALGORITHMS) + f" {'auto picks':>11s}")
    for S, T, K in [(1, 10_000, 2), (1, 10_000, 4), (1, 10_000, 8), (1, 10_000, 16), (8, 2000, 4),
                    (8, 2000, 8), (50, 2000, 8), (20, 1000, 16), (50, 1000, 16), (100, 1000, 16),
                    (10, 1000, 32), (1, 256, 4), (1, 64, 8), (3, 32, 4)]:
        fn = dist.DiscreteHMM(torch.randn(K, generator=g).log_softmax(-1), torch.randn(K, K, generator=g).log_softmax(-1),
                              dist.Categorical(torch.randn(K, 6, generator=g).softmax(-1)))
        X = torch.randint(6, (S, T), generator=g)
        times = []
        for algorithm in H.ALGORITHMS:
            with H.algorithm(algorithm):
                times.append(best_time(lambda: H.forward_backward(fn, X), repeat))
        pick = H.choose_algorithm(S, T, K, device)
        print(f"{S:5d} {T:7d} {K:3d} " + " ".join(f"{t:10.4f}" for t in times) + f" {pick:>11s}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scan", action="store_true", help="the forward-backward algorithms against each other")
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "WHO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
    else:
        with docs_table("bench_hmm" + (" --scan" if args.scan else ""), args.docs):
            scan(args.repeat) if args.scan else main(args.repeat)
