"""Time EM steps whose M-step needs gradients, against one E-step of the same model.

A param that enters its distribution through a computation has no closed form: the M-step
maximizes ``Q`` numerically. Its evaluations run ``Q`` captured as a graph of tensor
operations (:mod:`pyro_em.program`) from a batch's second on, and the closed-form stage of a
step is captured too, after 20 steps. This prints, for each model, one E-step, one
steady-state EM step (after 25 steps, as in a fit), their ratio (goal: at most 3 for the
mixture of regressions, at most 10 for the capture-recapture models), and the EM step that
runs the model every time (``EM(model, jit=False)``):

  * a mixture of K=3 linear regressions, N=2,000 points (intercepts and slopes by gradient);
  * Cormack-Jolly-Seber capture-recapture models as Pyro's examples write them (survival
    and recapture as MAP sites under Uniform priors), 200 animals x 10 occasions: model 1
    (constant survival) and model 2 (survival per occasion).

Also the first step of each, which plans the M-step. Float64, CPU.

Run:  python benchmarks/bench_gradient.py [--repeat 3]
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import constraints

from _timing import best_time, docs_table
from pyro_em import EM


def regression_mixture(x, y, K=3):
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    a = pyro.param("a", torch.linspace(-1.0, 1.0, K))
    b = pyro.param("b", torch.linspace(1.0, -1.0, K))
    s = pyro.param("s", torch.ones(K), constraint=constraints.positive)
    with pyro.plate("points", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(a[z] + b[z] * x, s[z]), obs=y)


def regression_data(N):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, generator=g) * 6 - 3
    z = torch.randint(3, (N,), generator=g)
    lines = torch.tensor([[2.0, 1.5], [0.0, -1.0], [-4.0, 2.5]])
    return x, lines[z, 0] + lines[z, 1] * x + 0.3 * torch.randn(N, generator=g)


def cjs(history, per_occasion):
    """Alive states z_t (enumerated, Bernoulli), entering at each animal's first capture."""
    N, T = history.shape
    rho = pyro.sample("rho", dist.Uniform(0.0, 1.0))
    phi_all = None if per_occasion else pyro.sample("phi", dist.Uniform(0.0, 1.0))
    seen = torch.zeros(N, dtype=torch.bool)
    z = torch.ones(N)
    animals = pyro.plate("animals", N, dim=-1)
    for t in pyro.markov(range(T)):
        phi = (pyro.sample(f"phi_{t}", dist.Uniform(0.0, 1.0)) if t > 0 else 1.0) if per_occasion else phi_all
        with animals, poutine.mask(mask=seen):
            alive_prob = seen.double() * phi * z + (1 - seen.double())
            z = pyro.sample(f"z_{t}", dist.Bernoulli(alive_prob), infer={"enumerate": "parallel"})
            pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=history[:, t])
        seen = seen | history[:, t].bool()


def cjs_data(N, T):
    g = torch.Generator().manual_seed(0)
    history = torch.zeros(N, T)
    first = torch.randint(0, T - 1, (N,), generator=g)
    alive = torch.ones(N, dtype=torch.bool)
    for t in range(T):
        alive &= (t <= first) | (torch.rand(N, generator=g) < 0.8)
        history[:, t] = ((t == first) | (alive & (t > first) & (torch.rand(N, generator=g) < 0.6))).double()
    return history


WARM_UP = 25


def measure(label, model, args, repeat):
    steps, firsts = {}, {}
    for recorded in (True, False):
        pyro.clear_param_store()
        em = EM(model, jit=recorded)
        start = time.perf_counter()
        em.step(*args)
        firsts[recorded] = time.perf_counter() - start
        for _ in range(WARM_UP):  # to the steady state of a fit: every capture made
            em.step(*args)
        if recorded:
            t_e = best_time(lambda: em.e_step(*args), repeat)
        steps[recorded] = best_time(lambda: em.step(*args), repeat)
    t_step, first = steps[True], firsts[True]
    print(f"{label:44s} {t_e:8.4f} {t_step:8.4f} {t_step / t_e:7.1f} {first:8.3f} {steps[False]:10.4f}")


def main(repeat):
    torch.set_default_dtype(torch.float64)
    print(f"Gradient M-step, float64, torch threads={torch.get_num_threads()}")
    print(f"{'model':44s} {'E-step':>8s} {'EM step':>8s} {'ratio':>7s} {'first':>8s} {'model run':>10s}  (seconds)")
    measure("mixture of 3 regressions, N=2,000", regression_mixture, regression_data(2000), repeat)
    history = cjs_data(200, 10)
    measure("CJS model 1 (phi, rho), 200 x 10", lambda h: cjs(h, False), (history,), repeat)
    measure("CJS model 2 (phi_t, rho), 200 x 10", lambda h: cjs(h, True), (history,), repeat)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--docs", action="store_true", help="also write the table into docs/performance.rst")
    args = parser.parse_args()
    with docs_table("bench_gradient", args.docs):
        main(args.repeat)
