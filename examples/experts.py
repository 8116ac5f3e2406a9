"""Regression by EM: a mixture of linear regressions and a radial-basis-function network.

A sensor's response y to an input x follows one of three straight lines depending on the
regime, and the regime depends on x. Two classic models that EM trains:

* a mixture of linear regressions: each point belongs to one of K lines, y ~ Normal(a_z + b_z x,
  s_z), z ~ Categorical(w). The lines' coefficients enter through a computation, so they take
  the (exact) gradient M-step; weights and noise scales are closed form.
* a radial-basis-function network as a mixture of experts (Mitchell 1997, ch. 6.12; Xu, Jordan
  & Hinton 1995): each expert has a Gaussian kernel over the inputs, x ~ Normal(c_z, r_z), and a
  line, y ~ Normal(a_z + b_z x, s_z). EM fits kernels and lines together; a prediction weighs
  the experts by their kernels' responsibility for x:
  E[y | x] = sum_z p(z | x) (a_z + b_z x), with p(z | x) proportional to w_z Normal(x | c_z, r_z).

Run:  python examples/experts.py [-n 600] [--experts 3] [--plot experts.png]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

import pyro_em
from pyro_em import EM

BREAKS = torch.tensor([-1.0, 1.0])
LINES = torch.tensor([[2.0, 1.5], [0.0, -1.0], [-4.0, 2.5]])  # intercept, slope per regime


def simulate(n: int):
    x = torch.rand(n) * 6 - 3
    regime = torch.bucketize(x, BREAKS)
    y = LINES[regime, 0] + LINES[regime, 1] * x + 0.3 * torch.randn(n)
    return x, y


def start(K: int, x: torch.Tensor):
    """Lines that start flat at the data's mean, kernels spread over the inputs."""
    return {"centres": torch.linspace(float(x.min()), float(x.max()), K + 2)[1:-1],
            "widths": torch.full((K,), float(x.std()) / K)}


def regression_mixture(x, y, K):
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    a = pyro.param("a", lambda: torch.randn(K))
    b = pyro.param("b", lambda: torch.randn(K))
    s = pyro.param("s", torch.ones(K), constraint=constraints.positive)
    with pyro.plate("points", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(a[z] + b[z] * x, s[z]), obs=y)


def rbf_experts(x, y, K):
    init = start(K, x)
    w = pyro.param("w", torch.ones(K) / K, constraint=constraints.simplex)
    c = pyro.param("c", init["centres"])
    r = pyro.param("r", init["widths"], constraint=constraints.positive)
    a = pyro.param("a", torch.zeros(K) + float(y.mean()))
    b = pyro.param("b", torch.zeros(K))
    s = pyro.param("s", torch.ones(K), constraint=constraints.positive)
    with pyro.plate("points", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(c[z], r[z]), obs=x)  # the expert's kernel over inputs
        pyro.sample("y", dist.Normal(a[z] + b[z] * x, s[z]), obs=y)  # the expert's line


def rbf_predict(x):
    w, c, r = (pyro.param(n).detach() for n in ("w", "c", "r"))
    a, b = pyro.param("a").detach(), pyro.param("b").detach()
    gate = (w.log() + dist.Normal(c, r).log_prob(x[:, None])).softmax(-1)
    return (gate * (a + b * x[:, None])).sum(-1)


def main(n: int = 600, K: int = 3, plot: str = "") -> None:
    pyro.set_rng_seed(0)
    x, y = simulate(n)
    x_test, y_test = simulate(1000)

    def init(x, y, K):
        """k-means on the standardized (x, y) points, then a least-squares line per cluster."""
        points = torch.stack([x, y], -1)
        _, labels = pyro_em.init.kmeans((points - points.mean(0)) / points.std(0), K)
        lines = [torch.linalg.lstsq(torch.stack([torch.ones_like(x[labels == k]), x[labels == k]], -1),
                                    y[labels == k, None]).solution.squeeze(-1) for k in range(K)]
        pyro.param("a", torch.stack([line[0] for line in lines]))
        pyro.param("b", torch.stack([line[1] for line in lines]))

    pyro.clear_param_store()
    em = EM(regression_mixture)
    result = em.fit(x, y, K, max_iter=100, tol=1e-6, n_init=4, init=init)
    print(f"mixture of {K} regressions: best of 4 starts, {result.n_iter} EM iterations, "
          f"log-likelihood {em.log_likelihood(x, y, K):.1f}")
    print(em.plan)
    order = pyro.param("a").detach().argsort()
    for k in order:
        print(f"  y = {pyro.param('a')[k]:6.2f} + {pyro.param('b')[k]:5.2f} x   (weight {pyro.param('w')[k]:.2f}, "
              f"noise {pyro.param('s')[k]:.2f})")
    print("  (simulated lines: " + "; ".join(f"{a:g} + {b:g} x" for a, b in LINES.tolist()) + ", noise 0.3)")
    print("  The mixture does not know that the regime depends on x: where the middle line crosses\n"
          "  the outer two it cannot tell them apart, so its middle component is a compromise, as\n"
          "  it should be. The gated model below uses x to choose the regime.")
    mixture_lines = (pyro.param("a").detach().clone(), pyro.param("b").detach().clone())

    pyro.clear_param_store()
    em = EM(rbf_experts)
    result = em.fit(x, y, K, max_iter=300, tol=1e-8)
    rmse = (rbf_predict(x_test) - y_test).square().mean().sqrt()
    print(f"RBF network of {K} experts: {result.n_iter} EM iterations, test RMSE {rmse:.3f} "
          f"(noise 0.3; one straight line: {(y_test - torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], -1), y[:, None]).solution.squeeze(-1) @ torch.stack([torch.ones_like(x_test), x_test])).square().mean().sqrt():.3f})")
    for k in pyro.param("c").detach().argsort():
        print(f"  kernel at x = {pyro.param('c')[k]:5.2f} (width {pyro.param('r')[k]:.2f}): "
              f"y = {pyro.param('a')[k]:6.2f} + {pyro.param('b')[k]:5.2f} x")

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = torch.linspace(-3, 3, 300)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.scatter(x, y, s=5, c="grey", alpha=0.5, label="data")
        for k in range(K):
            ax.plot(grid, mixture_lines[0][k] + mixture_lines[1][k] * grid, "--", lw=1,
                    label="mixture of regressions" if k == 0 else None, color="tab:blue")
        ax.plot(grid, rbf_predict(grid), color="crimson", lw=2, label="RBF experts: E[y | x]")
        ax.set_ylim(float(y.min()) - 1, float(y.max()) + 1)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title("Regression by EM: three regimes, two models", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=600, help="number of training points")
    parser.add_argument("--experts", type=int, default=3, help="number of lines / experts")
    parser.add_argument("--plot", default="", help="write a picture of both fits to this PNG file")
    args = parser.parse_args()
    main(args.n, args.experts, args.plot)
