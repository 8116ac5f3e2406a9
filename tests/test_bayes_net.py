"""EM for a discrete Bayesian network with a hidden node and a partly observed node:
closed-form CPT updates equal brute-force expected counts over all completions, per iteration."""

import itertools

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_em import EM

# A -> B (hidden in every row), (A, B) -> C, C -> D (missing in some rows).
NA, NB, NC, ND = 2, 3, 3, 2


def random_cpt(g, *shape):
    t = torch.rand(*shape, generator=g) + 0.2
    return t / t.sum(-1, keepdim=True)


def model(a, c, d, d_observed, init):
    cpt_a = pyro.param("cpt_a", init["cpt_a"].clone(), constraint=constraints.simplex)
    cpt_b = pyro.param("cpt_b", init["cpt_b"].clone(), constraint=constraints.simplex)
    cpt_c = pyro.param("cpt_c", init["cpt_c"].clone(), constraint=constraints.simplex)
    cpt_d = pyro.param("cpt_d", init["cpt_d"].clone(), constraint=constraints.simplex)
    with pyro.plate("rows", len(a)):
        a = pyro.sample("a", dist.Categorical(cpt_a), obs=a)
        b = pyro.sample("b", dist.Categorical(cpt_b[a]))
        c = pyro.sample("c", dist.Categorical(cpt_c[a, b]), obs=c)
        pyro.sample("d", dist.Categorical(cpt_d[c]), obs=d, obs_mask=d_observed)


def brute_force_em_step(a, c, d, d_observed, cpt):
    """One EM iteration by enumerating every completion (b, and d where missing) of each row."""
    counts = {name: torch.zeros_like(t) for name, t in cpt.items()}
    for i in range(len(a)):
        completions = []
        d_values = [int(d[i])] if d_observed[i] else range(ND)
        for b, dd in itertools.product(range(NB), d_values):
            p = cpt["cpt_a"][a[i]] * cpt["cpt_b"][a[i], b] * cpt["cpt_c"][a[i], b, c[i]] * cpt["cpt_d"][c[i], dd]
            completions.append((b, dd, p))
        total = sum(p for _, _, p in completions)
        counts["cpt_a"][a[i]] += 1
        for b, dd, p in completions:
            counts["cpt_b"][a[i], b] += p / total
            counts["cpt_c"][a[i], b, c[i]] += p / total
            counts["cpt_d"][c[i], dd] += p / total
    return {name: t / t.sum(-1, keepdim=True) for name, t in counts.items()}


def test_cpt_updates_equal_brute_force_expected_counts():
    g = torch.Generator().manual_seed(0)
    truth = {"cpt_a": random_cpt(g, NA), "cpt_b": random_cpt(g, NA, NB),
             "cpt_c": random_cpt(g, NA, NB, NC), "cpt_d": random_cpt(g, NC, ND)}
    N = 60
    a = torch.multinomial(truth["cpt_a"], N, replacement=True, generator=g)
    b = torch.multinomial(truth["cpt_b"][a], 1, generator=g).squeeze(-1)
    c = torch.multinomial(truth["cpt_c"][a, b], 1, generator=g).squeeze(-1)
    d = torch.multinomial(truth["cpt_d"][c], 1, generator=g).squeeze(-1)
    d_observed = torch.rand(N, generator=g) < 0.7
    init = {"cpt_a": random_cpt(g, NA), "cpt_b": random_cpt(g, NA, NB),
            "cpt_c": random_cpt(g, NA, NB, NC), "cpt_d": random_cpt(g, NC, ND)}

    em = EM(lambda: model(a, c, d, d_observed, init), m_step="closed_form")
    cpt = init
    for _ in range(4):
        em.step()
        cpt = brute_force_em_step(a, c, d, d_observed, cpt)
        for name, expected in cpt.items():
            torch.testing.assert_close(pyro.param(name).detach(), expected, atol=1e-8, rtol=0, msg=name)
