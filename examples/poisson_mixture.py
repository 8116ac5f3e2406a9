"""How many kinds of hour does a help desk have? A Poisson mixture, with K chosen by BIC.

Calls arrive at a help desk at a steady rate within each kind of hour (night, ordinary,
rush), but the logs do not say which kind an hour was. Counts per hour are modelled as a
mixture of Poissons; EM fits K = 1..max-k components (integer counts, as they come) and the
Bayesian information criterion picks the number of kinds.

Run:  python examples/poisson_mixture.py [-n 2000] [--max-k 5] [--plot counts.png]
"""

import argparse
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_em import EM, CollapseWarning

TRUE_RATES = torch.tensor([1.5, 8.0, 20.0])
TRUE_WEIGHTS = torch.tensor([0.3, 0.5, 0.2])


def model(counts: torch.Tensor, K: int) -> None:
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    # Spread the starting rates over the range of the data.
    rates = pyro.param("rates", lambda: torch.quantile(counts.to(torch.get_default_dtype()), torch.linspace(0.1, 0.9, K)).clamp_min(0.5),
                       constraint=constraints.positive)
    with pyro.plate("hours", len(counts)):
        z = pyro.sample("kind", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("calls", dist.Poisson(rates[z]), obs=counts)


def main(n: int = 2000, max_k: int = 5, plot: str = "") -> None:
    pyro.set_rng_seed(0)
    kind = dist.Categorical(TRUE_WEIGHTS).sample((n,))
    counts = dist.Poisson(TRUE_RATES[kind]).sample().long()  # integer counts

    print(f"{'K':>2s} {'log-likelihood':>15s} {'BIC':>10s}  rates")
    fits = {}
    for K in range(1, max_k + 1):
        pyro.clear_param_store()
        em = EM(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CollapseWarning)  # surplus components may empty out
            em.fit(counts, K, max_iter=500, tol=1e-9)
        fits[K] = (em.bic(counts, K), pyro.param("weights").detach().clone(), pyro.param("rates").detach().clone())
        print(f"{K:2d} {em.log_likelihood(counts, K):15.2f} {fits[K][0]:10.1f}  "
              + " ".join(f"{r:.2f}" for r in fits[K][2].sort().values))
    best = min(fits, key=lambda k: fits[k][0])
    order = fits[best][2].argsort()
    print(f"BIC chooses K = {best} kinds of hour:")
    for w, r in zip(fits[best][1][order], fits[best][2][order]):
        print(f"  {100 * w:5.1f}% of hours at {r:5.2f} calls per hour")
    print("(simulated: " + ", ".join(f"{100 * w:.0f}% at {r:g}" for w, r in zip(TRUE_WEIGHTS, TRUE_RATES)) + ")")

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = torch.arange(int(counts.max()) + 1)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.bar(values.numpy(), (torch.bincount(counts, minlength=len(values)) / n).numpy(), color="0.8", label="hours logged")
        weights, rates = fits[best][1][order], fits[best][2][order]
        parts = weights[:, None] * dist.Poisson(rates[:, None]).log_prob(values.to(rates.dtype)).exp()
        for w, r, part in zip(weights, rates, parts):
            ax.plot(values.numpy(), part.numpy(), lw=1, label=f"{100 * w:.0f}% at {r:.1f} calls/hour")
        ax.plot(values.numpy(), parts.sum(0).numpy(), "k", lw=2, label=f"fitted mixture, K = {best}")
        ax.set_xlabel("calls in an hour")
        ax.set_ylabel("fraction of hours")
        ax.set_title("Help-desk calls per hour: a Poisson mixture chosen by BIC", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="number of hours logged")
    parser.add_argument("--max-k", type=int, default=5, help="largest number of components tried")
    parser.add_argument("--plot", default="", help="write the counts and the fitted mixture to this PNG file")
    args = parser.parse_args()
    main(args.n, args.max_k, args.plot)
