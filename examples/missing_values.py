"""Iris with holes: a Gaussian mixture fitted to measurements with missing values, with
standard errors.

Fisher's iris flowers, four measurements each, with a fraction of the measurements deleted
at random. ``EM(model, nan_policy="omit")`` integrates the missing ones out (each flower is
scored by its observed measurements' marginal, and the M-step uses the missing ones'
conditional expectations), ``accelerate="squarem"`` speeds the fit up, and
``em.standard_errors`` gives each fitted mean its standard error from the observed
information. The means are printed beside those fitted to the complete data, and the
flowers' clusters are compared with their species.

Run:  python examples/missing_values.py [--missing 0.3] [--seed 0]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from sklearn.datasets import load_iris
from torch.distributions import constraints

from pyro_em import EM

FEATURES = ["sepal length", "sepal width", "petal length", "petal width"]


@pyro.infer.config_enumerate
def model(X: torch.Tensor, start: torch.Tensor) -> None:
    K, D = start.shape
    weights = pyro.param("weights", torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", start.clone())
    scale_tril = pyro.param("scale_tril", 0.5 * torch.eye(D).expand(K, D, D).clone(), constraint=constraints.lower_cholesky)
    with pyro.plate("flowers", len(X)):
        z = pyro.sample("species", dist.Categorical(weights))
        pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=X)


def fit(X: torch.Tensor, start: torch.Tensor):
    pyro.clear_param_store()
    em = EM(model, nan_policy="omit", accelerate="squarem")
    result = em.fit(X, start, tol=1e-10, max_iter=500)
    return em, result


def main(missing: float = 0.3, seed: int = 0) -> None:
    torch.set_default_dtype(torch.float64)
    iris = load_iris()
    complete, species = torch.tensor(iris.data), torch.tensor(iris.target)
    g = torch.Generator().manual_seed(seed)
    X = complete.clone()
    X[torch.rand(X.shape, generator=g) < missing] = float("nan")
    start = complete[[0, 50, 100]]  # one flower of each species, as the starting means
    print(f"{int(torch.isnan(X).sum())} of {X.numel()} measurements missing "
          f"({int(torch.isnan(X).all(-1).sum())} flowers with none left)")

    fit(complete, start)
    full = pyro.param("locs").detach().clone()
    em, result = fit(X, start)
    print(f"EM with the missing values integrated out: {'converged' if result.converged else 'stopped'} after "
          f"{result.n_iter} SQUAREM cycles ({result.n_e_steps} E-steps), log-likelihood {em.log_likelihood(X, start):.2f}")
    locs, se = pyro.param("locs").detach(), em.standard_errors(X, start)["locs"]
    for k, name in enumerate(iris.target_names):
        print(f"\n{name}: mean (standard error) with holes   complete data")
        for d, feature in enumerate(FEATURES):
            print(f"  {feature:13s} {locs[k, d]:6.2f} ({se[k, d]:.2f})              {full[k, d]:6.2f}")
    clusters = em.posterior(X, start)["species"].argmax(-1)
    print(f"\nflowers in the cluster of their species: {100 * float((clusters == species).double().mean()):.1f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--missing", type=float, default=0.3, help="fraction of the measurements to delete")
    parser.add_argument("--seed", type=int, default=0, help="which measurements are deleted")
    args = parser.parse_args()
    main(args.missing, args.seed)
