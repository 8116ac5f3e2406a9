"""Partial labels through Pyro's own idiom, obs_mask on the latent: the iterates of a
hand-written semi-supervised EM, whose responsibilities are one-hot where the label is known."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM


@pyro.infer.config_enumerate
def model(x, labels, known):
    w = pyro.param("w", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 0.0, 1.0]))
    scales = pyro.param("scales", torch.ones(3), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), obs=labels, obs_mask=known)
        pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=x)


def semi_supervised_step(x, labels, known, w, locs, scales):
    """One step by hand: the loss at (w, locs, scales) and the new params."""
    joint = w.log() + dist.Normal(locs, scales).log_prob(x.unsqueeze(-1))  # (N, K)
    labelled = joint.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = -(torch.where(known, labelled, torch.logsumexp(joint, -1))).sum()
    r = torch.where(known.unsqueeze(-1), torch.nn.functional.one_hot(labels, 3).double(), joint.softmax(-1))
    n = r.sum(0)
    locs = (r * x.unsqueeze(-1)).sum(0) / n
    scales = ((r * (x.unsqueeze(-1) - locs) ** 2).sum(0) / n).sqrt()
    return float(loss), n / len(x), locs, scales


def test_partial_labels_are_semi_supervised_em():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(3, (300,), generator=g)
    x = torch.tensor([-2.0, 0.5, 2.5])[truth] + 0.8 * torch.randn(300, generator=g)
    known = torch.rand(300, generator=g) < 0.2
    labels = torch.where(known, truth, 0)  # (a placeholder where unknown: never read)
    em = EM(model)
    w, locs, scales = torch.ones(3) / 3, torch.tensor([-1.0, 0.0, 1.0]), torch.ones(3)
    for _ in range(6):
        expected, w, locs, scales = semi_supervised_step(x, labels, known, w, locs, scales)
        assert em.step(x, labels, known) == pytest.approx(expected, rel=1e-12)
        for name, value in (("w", w), ("locs", locs), ("scales", scales)):
            torch.testing.assert_close(pyro.param(name).detach(), value, rtol=1e-10, atol=1e-12)
