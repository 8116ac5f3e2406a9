"""The occasionally dishonest casino (Durbin, Eddy, Krogh & Mitchison 1998, section 3.2).

A casino mostly rolls a fair die but now and then switches to a loaded one that shows a six
half of the time; it switches back more readily than it cheats. We only see the rolls. A
two-state hidden Markov model, written as one Pyro ``DiscreteHMM`` site, is fitted by EM
(Baum-Welch) from a neutral start; we print the recovered tables next to the truth and plot
the posterior probability of the loaded die along the rolls against the true die.

Run:  python examples/casino.py [--rolls 5000] [--plot casino.png]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_em import EM

FAIR, LOADED = 0, 1
TRUE_TRANS = torch.tensor([[0.95, 0.05], [0.10, 0.90]])
TRUE_EMIT = torch.tensor([[1 / 6] * 6, [0.1] * 5 + [0.5]])


def simulate(n: int):
    dice = torch.empty(n, dtype=torch.long)
    dice[0] = FAIR
    for t in range(1, n):
        dice[t] = dist.Categorical(TRUE_TRANS[dice[t - 1]]).sample()
    return dist.Categorical(TRUE_EMIT[dice]).sample(), dice


def model(rolls: torch.Tensor) -> None:
    # A neutral start: no die preferred, sticky transitions, emissions a little off uniform so
    # that the two states can tell themselves apart.
    start = pyro.param("start_logits", torch.zeros(2))
    trans = pyro.param("trans_logits", torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log())
    emit = pyro.param("emit", lambda: dist.Dirichlet(torch.full((2, 6), 50.0)).sample(), constraint=constraints.simplex)
    # DiscreteHMM's initial state comes before the first roll. The same model can be written
    # with pyro.markov: z[t] ~ Categorical(trans[z[t-1]]), roll[t] ~ Categorical(emit[z[t]]).
    pyro.sample("rolls", dist.DiscreteHMM(start, trans, dist.Categorical(emit)), obs=rolls)


def main(n: int = 5000, plot: str = "") -> None:
    pyro.set_rng_seed(0)
    rolls, dice = simulate(n)
    pyro.clear_param_store()
    em = EM(model, m_step="closed_form")
    result = em.fit(rolls, max_iter=500, tol=1e-8)
    print(f"{n} rolls, EM {'converged' if result.converged else 'stopped'} after {result.n_iter} iterations")

    emit = pyro.param("emit").detach()
    loaded = int(emit[:, 5].argmax())  # the state that favours sixes is the loaded die
    order = [1 - loaded, loaded]
    trans = pyro.param("trans_logits").detach().softmax(-1)[order][:, order]
    def fmt(row):
        return "[" + ", ".join(f"{p:.3f}" for p in row.tolist()) + "]"

    print("transition probabilities (rows: from fair, from loaded), fitted vs true:")
    for k, name in enumerate(["fair  ", "loaded"]):
        print(f"  {name} {fmt(trans[k])}  {fmt(TRUE_TRANS[k])}")
    print("emission probabilities of faces 1-6, fitted vs true:")
    for k, name in enumerate(["fair  ", "loaded"]):
        print(f"  {name} {fmt(emit[order[k]])}  {fmt(TRUE_EMIT[k])}")

    p_loaded = em.posterior(rolls)["rolls"][:, loaded]
    accuracy = ((p_loaded > 0.5).long() == dice).double().mean()
    print(f"rolls whose die is called right by the posterior: {100 * accuracy:.1f}%")

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = slice(0, min(n, 600))
        fig, ax = plt.subplots(figsize=(9, 3.4))
        ax.fill_between(range(shown.stop), dice[shown].numpy(), step="mid", color="lightgrey", label="loaded die truly in use")
        ax.plot(p_loaded[shown].numpy(), color="crimson", label="EM's posterior P(loaded | all rolls)")
        ax.set_xlabel("roll")
        ax.set_ylabel("probability")
        ax.set_ylim(-0.02, 1.02)
        # Legend above the axes, clear of the curve.
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        ax.set_title("The dishonest casino: Baum-Welch recovers when the loaded die was used\n"
                     "(grey: the truth, hidden from EM; red: EM's smoothed posterior)", fontsize=10, pad=28)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rolls", type=int, default=5000, help="number of rolls of the die")
    parser.add_argument("--plot", default="", help="write the posterior plot to this PNG file")
    args = parser.parse_args()
    main(args.rolls, args.plot)
