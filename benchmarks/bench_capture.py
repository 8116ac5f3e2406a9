"""What users wait for: whole fits in a fresh process, the default ``EM(model)`` against
``EM(model, jit=False)``, at several fit lengths; and the costs a capture is decided by
(:mod:`pyro_em.program`: ``CAPTURE_COST_PER_OP``, ``FIRST_CAPTURE_COST``, ``EAGER_COST_PER_OP``),
measured in eager operations.

Workloads (float64, CPU):

  * ``gmm``: a full-covariance Gaussian mixture, N=20,000, D=4, K=4 (a fused mixture);
  * ``iris``: scikit-learn's iris, K=3 full covariances, ``fit(n_init=10)`` from k-means++
    starts (restarts);
  * ``quake``: the 107 annual earthquake counts, a 3-state Poisson HMM written with
    ``pyro.markov`` (a fused chain);
  * ``markov``: a categorical HMM over 20 sequences of 300 steps (``pyro.markov``).

Each whole fit runs in a process of its own (``python3 bench_capture.py --child ...``): the
seconds from ``EM(...)`` to the fit's end, the model's imports excluded. The ratio is the
default's over ``jit=False``'s (the goal: at most 1.1 at every length). The costs are measured
in one warm process: a run of the closed-form stage in Python (per tensor operation it calls),
the graph's run, and its capture (per operation), each over the time of one eager operation.

Run:  python benchmarks/bench_capture.py [--repeat 3] [--docs]
"""

import argparse
import statistics
import subprocess
import sys
import time
import warnings

import torch

from _timing import docs_table

LENGTHS = (1, 5, 40, 200)  # steps (the markov HMM's jit=False fit takes 0.5 s a step: up to 40)


def workload(name):
    """``(model, args, EM options, fit options)``."""
    import pyro
    import pyro.distributions as dist
    from torch.distributions import constraints

    g = torch.Generator().manual_seed(0)
    if name == "gmm":
        K, D, N = 4, 4, 20_000
        data = torch.randn(N, D, generator=g) + 3 * torch.randint(K, (N, 1), generator=g)

        def model(data):
            w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
            locs = pyro.param("locs", data[:K].clone())
            tril = pyro.param("tril", torch.eye(D).expand(K, D, D).clone(), constraint=constraints.lower_cholesky)
            with pyro.plate("data", len(data)):
                z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=tril[z]), obs=data)

        return model, (data,), {}, {}
    if name == "iris":
        from sklearn.datasets import load_iris

        import pyro_em.init
        from bench_small import gmm

        data = torch.tensor(load_iris().data)
        pyro.set_rng_seed(0)
        starts = iter([pyro_em.init.kmeans_plusplus(data, 3) for _ in range(10)])
        return gmm, (data,), {"reg_covar": 1e-6}, {"n_init": 10, "init": lambda d: pyro.param("locs", next(starts))}
    if name == "quake":
        from bench_small import EARTHQUAKES, poisson_hmm

        return poisson_hmm, (torch.tensor(EARTHQUAKES, dtype=torch.float64),), {}, {}
    T, S, K = 300, 20, 3
    data = torch.randint(4, (T, S), generator=g)
    emit0 = torch.rand(K, 4, generator=g) + 0.5

    def markov(data):
        start = pyro.param("start", torch.ones(K) / K, constraint=constraints.simplex)
        trans = pyro.param("trans", torch.full((K, K), 0.2) + 0.4 * torch.eye(K), constraint=constraints.simplex)
        emit = pyro.param("emit", emit0, constraint=constraints.simplex)
        with pyro.plate("seqs", data.shape[1]):
            z = None
            for t in pyro.markov(range(data.shape[0])):
                z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]), infer={"enumerate": "parallel"})
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=data[t])

    return markov, (data,), {}, {}


def child(name, jit, steps):
    """One whole fit in this (fresh) process; prints its seconds."""
    from pyro_em import EM

    torch.set_default_dtype(torch.float64)
    model, args, options, fit_options = workload(name)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    EM(model, jit=jit, **options).fit(*args, max_iter=steps, tol=0.0, **fit_options)
    print(time.perf_counter() - start)


def fresh(name, jit, steps, repeat):
    """The median seconds of ``repeat`` whole fits, each in a fresh process."""
    times = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", name, str(int(jit)), str(steps)],
                             capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def costs(name):
    """Per tensor operation of the stage's run in Python: its cost, its graph's and its
    capture's, in eager operations; and the operations counted."""
    import pyro

    import pyro_em.program as program
    from pyro_em import EM

    torch.set_default_dtype(torch.float64)
    model, args, options, _ = workload(name)
    x = torch.randn(3)
    start = time.perf_counter()
    for _ in range(20_000):
        x = x + 1
    unit = (time.perf_counter() - start) / 20_000
    pyro.clear_param_store()
    em = EM(model, **options)
    for _ in range(3):
        em.step(*args)
    held = em._planner.latest.step.program
    start = time.perf_counter()
    for _ in range(10):
        em.step(*args)
    eager = (time.perf_counter() - start) / 10
    program.CAPTURE_AT_ONCE = True
    try:
        start = time.perf_counter()
        em.step(*args)
        capture = time.perf_counter() - start - eager
        start = time.perf_counter()
        for _ in range(10):
            em.step(*args)
        graph = (time.perf_counter() - start) / 10
    finally:
        program.CAPTURE_AT_ONCE = False
    ops = held.eager_ops
    return ops, eager / ops / unit, graph / ops / unit, capture / ops / unit, unit


def first_imports():
    """A fresh process's first ``make_fx`` call (the imports it makes), in seconds."""
    code = ("import time, torch\nfrom torch.fx.experimental import proxy_tensor\nt = time.perf_counter()\n"
            "proxy_tensor.make_fx(lambda x: (x * 2).sum(), tracing_mode='real')(torch.ones(3))\n"
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(repeat, workloads):
    print(f"Whole fits in a fresh process (median of {repeat}), default EM(model) / EM(model, jit=False),"
          f" float64, torch threads={torch.get_num_threads()}")
    print(f"{'workload':10s}" + "".join(f"{f'{n} steps':>22s}" for n in LENGTHS))
    for name in workloads:
        cells = []
        for steps in LENGTHS:
            if name == "markov" and steps > 40:
                cells.append("")
                continue
            default, plain = fresh(name, True, steps, repeat), fresh(name, False, steps, repeat)
            cells.append(f"{default:6.2f} / {plain:6.2f} = {default / plain:4.2f}")
        print(f"{name:10s}" + "".join(f"{c:>22s}" for c in cells))
    print()
    seconds = first_imports()
    print("Costs in eager operations (one tensor operation from Python: the unit), per operation the stage's")
    print("run in Python calls (warm process):")
    print(f"{'workload':10s}{'ops':>7s}{'unit (us)':>11s}{'eager':>8s}{'graph':>8s}{'capture':>9s}")
    unit = None
    for name in workloads:
        if name == "iris":
            continue
        ops, eager, graph, capture, unit = costs(name)
        print(f"{name:10s}{ops:7d}{unit * 1e6:11.2f}{eager:8.2f}{graph:8.2f}{capture:9.0f}")
    print(f"a process's first make_fx call: {seconds:.2f} s = {seconds / unit:,.0f} units")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]))
        sys.exit()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="gmm,iris,quake,markov")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/performance.rst")
    args = parser.parse_args()
    with docs_table("bench_capture", args.docs):
        main(args.repeat, args.workloads.split(","))
