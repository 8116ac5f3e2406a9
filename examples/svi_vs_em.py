"""SVI vs EM: one Pyro model fitted both ways, log-likelihood against wall time.

A Gaussian mixture written once, as a Pyro user writes it, is fitted by
``SVI(model, guide, Adam, TraceEnum_ELBO())`` (gradient steps on the marginal likelihood, the
discrete latents summed out by enumeration) and by ``EM(model)`` (closed-form M-steps from
the exact posterior), from the same starting values. Both climb the same log-likelihood; the
plot shows how fast.

Run:  python examples/svi_vs_em.py [-n 2000] [--svi-steps 1500] [--lr 0.05] [--plot svi_vs_em.png]
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from torch.distributions import constraints

from pyro_em import EM

K = 3
START = {"weights": torch.ones(K) / K, "locs": torch.tensor([-1.0, 0.0, 1.0]), "scales": torch.ones(K)}


@config_enumerate
def model(data):
    weights = pyro.param("weights", START["weights"].clone(), constraint=constraints.simplex)
    locs = pyro.param("locs", START["locs"].clone())
    scales = pyro.param("scales", START["scales"].clone(), constraint=constraints.positive)
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)


def guide(data):  # every latent is enumerated in the model: nothing to guess
    pass


def trajectory(fit_step, steps, evaluate):
    """(seconds, log-likelihood) after each step, timing the steps alone."""
    elapsed, points = 0.0, []
    for _ in range(steps):
        t = time.perf_counter()
        fit_step()
        elapsed += time.perf_counter() - t
        points.append((elapsed, evaluate()))
    return points


def main(n: int = 2000, svi_steps: int = 1500, lr: float = 0.05, plot: str = "") -> None:
    pyro.set_rng_seed(0)
    data = torch.cat([torch.randn(n // 2) * 0.8 - 4, torch.randn(n // 4) * 0.5, torch.randn(n - 3 * n // 4) * 1.2 + 5])
    elbo = TraceEnum_ELBO(max_plate_nesting=1)

    def log_likelihood():
        return -elbo.loss(model, guide, data)

    pyro.clear_param_store()
    em = EM(model)
    em_points = trajectory(lambda: em.step(data), 60, lambda: em.log_likelihood(data))

    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    svi_points = trajectory(lambda: svi.step(data), svi_steps, log_likelihood)

    best = max(p[1] for p in em_points + svi_points)
    for name, points in (("EM", em_points), ("SVI", svi_points)):
        reached = next((t for t, ll in points if ll >= best - 1e-5 * abs(best)), None)
        print(f"{name:3s}: final log-likelihood {points[-1][1]:.3f} after {len(points)} steps, {points[-1][0]:.2f} s"
              + (f"; within 1e-5 (relative) of the best after {reached:.2f} s" if reached is not None else ""))

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from matplotlib.ticker import NullFormatter

        fig, ax = plt.subplots(figsize=(6.5, 4))
        floor = 10 * torch.finfo(data.dtype).eps * abs(best)  # (round-off: the best point itself)
        for name, points, colour in (("EM", em_points, "crimson"), ("SVI (Adam)", svi_points, "tab:blue")):
            t, ll = zip(*points)
            ax.plot(t, [max(best - v, floor) for v in ll], color=colour, label=name, marker=".", markersize=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # (minor labels overlap on short ranges)
        ax.set_xlabel("wall time (s, log scale)")
        ax.set_ylabel("log-likelihood below the best reached")
        ax.set_title(f"One Pyro mixture (N={n}) fitted by SVI and by EM", fontsize=10)
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="number of data points")
    parser.add_argument("--svi-steps", type=int, default=1500, help="number of SVI steps")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate for SVI")
    parser.add_argument("--plot", default="", help="write the curves to this PNG file")
    args = parser.parse_args()
    main(args.n, args.svi_steps, args.lr, args.plot)
