"""Starting points for EM: k-means++ seeding, Lloyd's iterations, random responsibilities and
moments of the data.

EM climbs to a local optimum of the likelihood from wherever it starts, and mixtures have many:
components that share a cluster, components stuck between clusters. A start that puts one
centre in each cluster (k-means++ then a few Lloyd iterations, as scikit-learn does) avoids most
of them; restarts (``EM.fit(..., n_init=R, init=fn)``) take care of the rest. Everything here
runs in torch on the data's device and draws from torch's generator, so
:func:`pyro.set_rng_seed` makes it reproducible.

Example (initialize a Gaussian mixture's params before fitting)::

    def init(data):
        centres, labels = pyro_em.init.kmeans(data, K)
        weights, means, covariances = pyro_em.init.moments(data, labels, K)
        pyro.param("weights", weights, constraint=constraints.simplex)
        pyro.param("locs", means)
        pyro.param("scale_tril", torch.linalg.cholesky(covariances),
                   constraint=constraints.lower_cholesky)

    em.fit(data, n_init=5, init=init)
"""

from typing import Tuple

import torch


def _check(data: torch.Tensor, k: int) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() not in (1, 2):
        raise ValueError("data must be a tensor of shape (N,) or (N, D).")
    if not isinstance(k, int) or not 1 <= k <= len(data):
        raise ValueError(f"k must be an integer between 1 and the number of data points ({len(data)}), got {k!r}.")
    return data if data.dim() == 2 else data.unsqueeze(-1)


def kmeans_plusplus(data: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): the first centre uniformly at random,
    each next one a data point drawn with probability proportional to its squared distance to
    the nearest centre so far.

    :param data: ``(N, D)`` or ``(N,)`` tensor.
    :param k: number of centres.
    :returns: ``(k, D)`` (or ``(k,)``) centres, rows of ``data``.
    """
    X = _check(data, k)
    index = [int(torch.randint(len(X), (1,), device=X.device))]
    d2 = (X - X[index[0]]).square().sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / len(X))
        index.append(int(torch.multinomial(probs, 1)))
        d2 = torch.minimum(d2, (X - X[index[-1]]).square().sum(-1))
    centres = X[index]
    return centres if data.dim() == 2 else centres.squeeze(-1)


def kmeans(data: torch.Tensor, k: int, n_iter: int = 10, centres=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from ``centres`` (k-means++ seeds by default). An empty cluster keeps
    its centre.

    :returns: ``(centres, labels)``: ``(k, D)`` centres and ``(N,)`` nearest-centre labels.
    """
    X = _check(data, k)
    C = kmeans_plusplus(X, k) if centres is None else torch.as_tensor(centres, dtype=X.dtype, device=X.device).reshape(k, -1)
    for _ in range(n_iter):
        labels = torch.cdist(X, C).argmin(-1)
        counts = torch.bincount(labels, minlength=k).to(X.dtype)
        sums = X.new_zeros(k, X.shape[-1]).index_add_(0, labels, X)
        C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
    labels = torch.cdist(X, C).argmin(-1)
    return (C if data.dim() == 2 else C.squeeze(-1)), labels


def random_responsibilities(n: int, k: int, dtype=None, device=None) -> torch.Tensor:
    """``(n, k)`` rows drawn uniformly from the simplex (Dirichlet(1)): a soft random start."""
    r = -torch.rand(n, k, dtype=dtype, device=device).log()
    return r / r.sum(-1, keepdim=True)


def moments(data: torch.Tensor, assignment: torch.Tensor, k: int, reg_covar: float = 1e-6):
    """Weights, means and covariances of ``k`` components from hard labels ``(N,)`` or soft
    responsibilities ``(N, k)`` (the M-step of a Gaussian mixture). An empty component gets
    the overall mean and covariance.

    :returns: ``(weights (k,), means (k, D), covariances (k, D, D))``.
    """
    X = _check(data, k)
    r = assignment if assignment.dim() == 2 else torch.nn.functional.one_hot(assignment, k).to(X.dtype)
    nk = r.sum(0)
    overall_mean = X.mean(0)
    overall_cov = torch.atleast_2d(torch.cov(X.T, correction=0)) if len(X) > 1 else torch.eye(X.shape[-1], dtype=X.dtype)
    means = torch.where(nk[:, None] > 0, (r.T @ X) / nk.clamp_min(1e-300)[:, None], overall_mean)
    diff = X[None] - means[:, None]  # (k, N, D)
    covs = torch.einsum("nk,knd,kne->kde", r, diff, diff) / nk.clamp_min(1e-300)[:, None, None]
    covs = torch.where(nk[:, None, None] > 0, covs, overall_cov)
    covs = covs + reg_covar * torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return nk / nk.sum(), means, covs
