"""Learning a Bayesian network's tables by EM, with a hidden node and missing values.

The sprinkler network (Russell & Norvig): Cloudy -> Sprinkler, Cloudy -> Rain,
(Sprinkler, Rain) -> WetGrass. A garden log records the sprinkler and the rain every day, and
whether the grass was wet on most days; nobody wrote down the clouds. We write the network as
a Pyro model, with conditional probability tables as simplex params indexed by the parents'
values, Cloudy as an enumerated latent, and WetGrass observed through ``obs_mask``. EM's
closed-form M-step turns expected counts into new tables.

Run:  python examples/sprinkler.py [-n 5000]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_em import EM

TRUTH = {
    "cloudy": torch.tensor([0.5, 0.5]),
    "sprinkler": torch.tensor([[0.5, 0.5], [0.9, 0.1]]),  # [cloudy] -> P(sprinkler)
    "rain": torch.tensor([[0.8, 0.2], [0.2, 0.8]]),  # [cloudy] -> P(rain)
    "wet": torch.tensor([[[1.0, 0.0], [0.1, 0.9]], [[0.1, 0.9], [0.01, 0.99]]]),  # [sprinkler, rain]
}


def simulate(n: int, p_missing: float = 0.3):
    c = dist.Categorical(TRUTH["cloudy"]).sample((n,))
    s = dist.Categorical(TRUTH["sprinkler"][c]).sample()
    r = dist.Categorical(TRUTH["rain"][c]).sample()
    w = dist.Categorical(TRUTH["wet"][s, r]).sample()
    return s, r, w, torch.rand(n) > p_missing


def model(sprinkler, rain, wet, wet_observed):
    def table(name, *shape):  # a neutral but asymmetric start, so the hidden node can be learned
        start = torch.ones(*shape) + 0.1 * torch.arange(shape[-1] * 1.0).flip(0) * torch.rand(*shape[:-1], 1)
        return pyro.param(name, start / start.sum(-1, keepdim=True), constraint=constraints.simplex)

    p_cloudy, p_sprinkler = table("cloudy", 2), table("sprinkler", 2, 2)
    p_rain, p_wet = table("rain", 2, 2), table("wet", 2, 2, 2)
    with pyro.plate("days", len(sprinkler)):
        c = pyro.sample("cloudy_today", dist.Categorical(p_cloudy))
        s = pyro.sample("sprinkler_on", dist.Categorical(p_sprinkler[c]), obs=sprinkler)
        r = pyro.sample("rained", dist.Categorical(p_rain[c]), obs=rain)
        pyro.sample("grass_wet", dist.Categorical(p_wet[s, r]), obs=wet, obs_mask=wet_observed)


def main(n: int = 5000) -> None:
    pyro.set_rng_seed(0)
    data = simulate(n)
    pyro.clear_param_store()
    em = EM(model, m_step="closed_form")
    result = em.fit(*data, max_iter=500, tol=1e-9)
    print(f"{n} days, {int((~data[3]).sum())} without a WetGrass entry; EM "
          f"{'converged' if result.converged else 'stopped'} after {result.n_iter} iterations")
    print(em.plan)

    # The hidden node's two values can come out swapped: align them with the truth.
    rain = pyro.param("rain").detach()
    swap = bool(rain[0, 1] > rain[1, 1])
    order = [1, 0] if swap else [0, 1]

    def fmt(t):
        return str([round(v, 3) for v in t.reshape(-1).tolist()])

    print("P(... = 1 | parents), fitted vs true (parents' values in row-major order):")
    print(f"  cloudy     {fmt(pyro.param('cloudy').detach()[order][1])}  {fmt(TRUTH['cloudy'][1])}")
    print(f"  sprinkler  {fmt(pyro.param('sprinkler').detach()[order][:, 1])}  {fmt(TRUTH['sprinkler'][:, 1])}")
    print(f"  rain       {fmt(rain[order][:, 1])}  {fmt(TRUTH['rain'][:, 1])}")
    print(f"  wet grass  {fmt(pyro.param('wet').detach()[..., 1])}  {fmt(TRUTH['wet'][..., 1])}")
    p_cloudy = em.posterior(*data)["cloudy_today"][:, order[1]]
    for day in range(3):
        s, r = int(data[0][day]), int(data[1][day])
        print(f"day {day + 1}: sprinkler {'on' if s else 'off'}, {'rain' if r else 'no rain'}: "
              f"P(cloudy) = {p_cloudy[day]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="number of days in the garden log")
    args = parser.parse_args()
    main(args.n)
