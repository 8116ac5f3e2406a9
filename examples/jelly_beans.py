"""Sorting jelly beans by flavour with a Gaussian mixture fitted by EM.

A candy factory's sorting machine measures each jelly bean's length (mm) and hue (degrees)
but cannot taste it. Three flavours were mixed in unknown proportions; each flavour's beans
scatter around a typical size and colour, with correlated size and hue. We write the mixture
as an ordinary Pyro model, fit it with ``pyro_em.EM``, then read off each bean's flavour
responsibilities and the MAP assignment with Pyro's ``infer_discrete``.

Run:  python examples/jelly_beans.py [-n 600] [--plot jelly_beans.png]
"""

import argparse
import itertools

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate, infer_discrete
from torch.distributions import constraints

import pyro_em
from pyro_em import EM

FLAVOURS = ["cherry", "lime", "lemon"]
TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
TRUE_LOCS = torch.tensor([[15.0, 350.0], [17.0, 95.0], [14.5, 70.0]])
TRUE_COVS = torch.tensor(
    [[[1.0, 3.0], [3.0, 25.0]], [[1.5, -4.0], [-4.0, 100.0]], [[0.6, 2.0], [2.0, 64.0]]]
)


def simulate(n: int) -> tuple:
    flavour = dist.Categorical(TRUE_WEIGHTS).sample((n,))
    beans = dist.MultivariateNormal(TRUE_LOCS[flavour], TRUE_COVS[flavour]).sample()
    return beans, flavour


def model(beans: torch.Tensor, K: int = 3) -> None:
    D = beans.shape[-1]
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: beans[torch.randperm(len(beans))[:K]])
    scale_tril = pyro.param(
        "scale_tril",
        torch.diag_embed(beans.std(0)).expand(K, D, D).clone(),
        constraint=constraints.lower_cholesky,
    )
    with pyro.plate("beans", len(beans)):
        z = pyro.sample("flavour", dist.Categorical(weights))
        pyro.sample("measurement", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=beans)


def main(n: int = 600, plot: str = "") -> None:
    pyro.set_rng_seed(0)
    beans, true_flavour = simulate(n)
    pyro.clear_param_store()

    # EM finds a local optimum: start from k-means (pyro_em.init) on standardized beans, and
    # keep the best of a few restarts.
    def init(beans):
        scale = beans.std(0)
        centres, labels = pyro_em.init.kmeans(beans / scale, 3)
        weights, means, covs = pyro_em.init.moments(beans, labels, 3)
        pyro.param("weights", weights, constraint=constraints.simplex)
        pyro.param("locs", means)
        pyro.param("scale_tril", torch.linalg.cholesky(covs), constraint=constraints.lower_cholesky)

    em = EM(model, reg_covar=1e-6)
    result = em.fit(beans, max_iter=200, tol=1e-8, n_init=3, init=init)
    print(f"EM {'converged' if result.converged else 'stopped'} after {result.n_iter} iterations "
          f"(best of {len(result.run_losses)} starts), log-likelihood {em.log_likelihood(beans):.2f}")

    # Components are found in arbitrary order: match them one to one to the true flavours,
    # by the permutation that puts the fitted means nearest the true ones.
    locs = pyro.param("locs").detach()
    distance = torch.cdist(TRUE_LOCS / TRUE_LOCS.std(0), locs / TRUE_LOCS.std(0))
    order = torch.tensor(min(itertools.permutations(range(3)), key=lambda p: float(distance[range(3), list(p)].sum())))
    weights = pyro.param("weights").detach()[order]
    covs = (lambda L: L @ L.mT)(pyro.param("scale_tril").detach())[order]
    print(f"{'flavour':8s} {'weight':>13s} {'length (mm)':>17s} {'hue (deg)':>17s}")
    for k, name in enumerate(FLAVOURS):
        print(f"{name:8s} {weights[k]:6.3f} ({TRUE_WEIGHTS[k]:.2f})"
              f" {locs[order][k, 0]:8.2f} ({TRUE_LOCS[k, 0]:5.1f})"
              f" {locs[order][k, 1]:8.1f} ({TRUE_LOCS[k, 1]:5.0f})")
    print("(true values in parentheses)")
    print("fitted covariance of lime:", [[round(float(c), 2) for c in row] for row in covs[1]],
          "(true", TRUE_COVS[1].tolist(), end=")\n")

    responsibilities = em.posterior(beans)["flavour"][:, order]
    print("flavour probabilities of the three most ambiguous beans:")
    for row in responsibilities[responsibilities.max(-1).values.argsort()[:3]]:
        print("  " + ", ".join(f"{f} {p:.3f}" for f, p in zip(FLAVOURS, row)))

    # MAP flavour of every bean with Pyro's own infer_discrete.
    decoder = infer_discrete(config_enumerate(em.fitted_model), temperature=0, first_available_dim=-2)
    assigned = poutine.trace(decoder).get_trace(beans).nodes["flavour"]["value"]
    relabel = torch.empty_like(order)
    relabel[order] = torch.arange(len(order))
    accuracy = (relabel[assigned] == true_flavour).double().mean()
    print(f"beans sorted into their true flavour: {100 * accuracy:.1f}%")

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colours = ["crimson", "limegreen", "gold"]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for k, (name, colour) in enumerate(zip(FLAVOURS, colours)):
            mine = relabel[assigned] == k
            ax.scatter(beans[mine, 0], beans[mine, 1], s=8, c=colour, label=f"sorted as {name}")
        ax.scatter(locs[order][:, 0], locs[order][:, 1], marker="x", s=120, c="black", label="fitted means")
        ax.set_xlabel("length (mm)")
        ax.set_ylabel("hue (degrees)")
        ax.set_title("Jelly beans sorted by EM")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=600, help="number of jelly beans")
    parser.add_argument("--plot", default="", help="write a scatter plot to this PNG file")
    args = parser.parse_args()
    main(args.n, args.plot)
