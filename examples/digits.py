"""Handwritten digits as a mixture of Bernoulli images, fitted by EM.

scikit-learn's bundled 8 x 8 digits, each pixel set on where its ink exceeds half, are modelled
as a mixture of K independent-pixel images: a component is a template of "on" probabilities.
EM learns the templates without ever seeing a label; we then check how well the clusters
agree with the digits (each cluster named by its most common digit) and draw the templates.

Run:  python examples/digits.py [-k 10] [-n 1797] [--restarts 3] [--plot digits.png]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_digits
from torch.distributions import constraints

import pyro_em
from pyro_em import EM


def model(images: torch.Tensor, K: int) -> None:
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    templates = pyro.param("templates", lambda: 0.25 + 0.5 * torch.rand(K, images.shape[-1]),
                           constraint=constraints.unit_interval)
    with pyro.plate("images", len(images)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Bernoulli(templates[z]).to_event(1), obs=images)


def main(K: int = 10, n: int = 1797, restarts: int = 3, plot: str = "") -> None:
    pyro.set_rng_seed(0)
    digits = load_digits()
    images = torch.as_tensor(digits.data[:n] > 7, dtype=torch.get_default_dtype())
    labels = torch.as_tensor(digits.target[:n])

    def init(images, K):  # k-means centres, pulled away from 0 and 1
        centres, assignment = pyro_em.init.kmeans(images, K)
        pyro.param("templates", centres.clamp(0.05, 0.95), constraint=constraints.unit_interval)

    em = EM(model)
    result = em.fit(images, K, max_iter=200, tol=1e-7, n_init=restarts, init=init)
    print(f"EM converged after {result.n_iter} iterations (best of {restarts} starts): "
          f"log-likelihood {em.log_likelihood(images, K) / n:.2f} per image, BIC {em.bic(images, K):.0f}")
    print(em.plan)

    cluster = em.decode(images, K)["z"]
    named = torch.stack([torch.bincount(labels[cluster == k], minlength=10).argmax() for k in range(K)])
    purity = (named[cluster] == labels).double().mean()
    print("cluster -> most common digit:", named.tolist())
    print(f"images whose cluster is named after their digit: {100 * purity:.1f}%")

    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        templates = pyro.param("templates").detach()
        weights = pyro.param("weights").detach()
        cols = min(K, 5)
        rows = (K + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.1 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < K:
                ax.imshow(templates[k].reshape(8, 8).numpy(), cmap="Greys", vmin=0, vmax=1)
                ax.set_title(f"'{int(named[k])}'  w={weights[k]:.2f}", fontsize=9)
        fig.suptitle("Bernoulli-mixture templates learned by EM (no labels used)", fontsize=10)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", type=int, default=10, help="number of clusters")
    parser.add_argument("-n", type=int, default=1797, help="number of images used")
    parser.add_argument("--restarts", type=int, default=3, help="EM runs from k-means starts")
    parser.add_argument("--plot", default="", help="write the templates to this PNG file")
    args = parser.parse_args()
    main(args.k, args.n, args.restarts, args.plot)
