"""The E-step's log marginal likelihood and posterior marginals against brute-force enumeration."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops import packed
from torch.distributions import constraints

from pyro_em import EM


def normal_lp(x, loc, scale):
    return dist.Normal(loc, scale).log_prob(x)


@pytest.mark.parametrize("family", ["categorical", "onehot", "bernoulli", "binomial"])
def test_mixture_log_likelihood(family, device):
    K = {"bernoulli": 2, "binomial": 4}.get(family, 3)
    data = torch.randn(50, device=device) * 3
    weights = torch.rand(K, device=device) + 0.1
    weights /= weights.sum()
    locs = torch.linspace(-3, 3, K, device=device)
    scales = torch.linspace(0.5, 2, K, device=device)

    def model(data):
        w = pyro.param("w", weights, constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            if family == "categorical":
                z = pyro.sample("z", dist.Categorical(w))
            elif family == "onehot":
                z = pyro.sample("z", dist.OneHotCategorical(w)).argmax(-1)
            elif family == "bernoulli":
                z = pyro.sample("z", dist.Bernoulli(w[1])).long()
            else:
                z = pyro.sample("z", dist.Binomial(K - 1, w[1])).long()
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)

    if family == "bernoulli":
        prior = torch.stack([1 - weights[1], weights[1]])
    elif family == "binomial":
        prior = dist.Binomial(K - 1, weights[1]).log_prob(torch.arange(float(K), device=device)).exp()
    else:
        prior = weights
    joint = prior.log() + normal_lp(data[:, None], locs, scales)  # (N, K)
    expected = joint.logsumexp(-1).sum()

    em = EM(model)
    assert em.evaluate_loss(data) == pytest.approx(-expected.item(), rel=1e-12)
    post = em.posterior(data)["z"]
    assert post.shape == (50, K) and post.device.type == device.type
    torch.testing.assert_close(post, (joint - joint.logsumexp(-1, keepdim=True)).exp())


def test_two_dependent_latents():
    """z1 -> z2 -> x inside one plate; brute force over all (z1, z2) pairs."""
    data = torch.randn(30) * 2
    p1 = torch.tensor([0.2, 0.8])
    trans = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    locs = torch.randn(2, 3) * 2

    def model(data):
        pyro.param("p1", p1, constraint=constraints.simplex)
        with pyro.plate("data", len(data)):
            z1 = pyro.sample("z1", dist.Categorical(pyro.param("p1")))
            z2 = pyro.sample("z2", dist.Categorical(trans[z1]))
            pyro.sample("x", dist.Normal(locs[z1, z2], 1.0), obs=data)

    joint = torch.empty(30, 2, 3)
    for a, b in itertools.product(range(2), range(3)):
        joint[:, a, b] = p1[a].log() + trans[a, b].log() + normal_lp(data, locs[a, b], 1.0)
    em = EM(model)
    assert em.evaluate_loss(data) == pytest.approx(-joint.logsumexp((1, 2)).sum().item(), rel=1e-12)
    post = em.posterior(data)
    norm = joint.logsumexp((1, 2), keepdim=True)
    torch.testing.assert_close(post["z1"], (joint - norm).exp().sum(2))
    torch.testing.assert_close(post["z2"], (joint - norm).exp().sum(1))


def test_nested_plates_with_global_latent():
    """A global switch c, a latent g per group, a latent z per item within each group."""
    G, I = 3, 4
    data = torch.randn(I, G) * 2  # items along dim -2, groups along dim -1
    pc = torch.tensor([0.3, 0.7])
    pg = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    pz = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    locs = torch.randn(2, 2, 3)

    def model(data):
        pyro.param("pc", pc, constraint=constraints.simplex)
        c = pyro.sample("c", dist.Categorical(pyro.param("pc")))
        with pyro.plate("groups", G, dim=-1):
            g = pyro.sample("g", dist.Categorical(pg[c]))
            with pyro.plate("items", I, dim=-2):
                z = pyro.sample("z", dist.Categorical(pz[g]))
                pyro.sample("x", dist.Normal(locs[c, g, z], 1.0), obs=data)

    # brute force
    per_c = []
    for c in range(2):
        total = pc[c].log()
        for j in range(G):
            per_g = []
            for g in range(2):
                lp = pg[c, g].log()
                for i in range(I):
                    lp = lp + torch.stack(
                        [pz[g, z].log() + normal_lp(data[i, j], locs[c, g, z], 1.0) for z in range(3)]
                    ).logsumexp(0)
                per_g.append(lp)
            total = total + torch.stack(per_g).logsumexp(0)
        per_c.append(total)
    per_c = torch.stack(per_c)
    em = EM(model)
    assert em.evaluate_loss(data) == pytest.approx(-per_c.logsumexp(0).item(), rel=1e-12)
    post = em.posterior(data)
    torch.testing.assert_close(post["c"], (per_c - per_c.logsumexp(0)).exp())
    assert post["g"].shape == (G, 2) and post["z"].shape == (I, G, 3)
    torch.testing.assert_close(post["z"].sum(-1), torch.ones(I, G))


def hmm_model(trans0, emit0, init0):
    def model(data):
        init = pyro.param("init", init0, constraint=constraints.simplex)
        trans = pyro.param("trans", trans0, constraint=constraints.simplex)
        emit = pyro.param("emit", emit0, constraint=constraints.simplex)
        with pyro.plate("seqs", data.shape[0], dim=-1):
            z = None
            for t in pyro.markov(range(data.shape[1])):
                probs = init if z is None else trans[z]
                z = pyro.sample(f"z_{t}", dist.Categorical(probs))
                pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=data[:, t])

    return model


def hmm_brute_force(data, init, trans, emit):
    """log p(x) per sequence and the pairwise posteriors p(z_{t-1}, z_t | x), over all K^T paths."""
    S, T = data.shape
    K = len(init)
    paths = torch.tensor(list(itertools.product(range(K), repeat=T)))  # (K^T, T)
    lp = init.log()[paths[:, 0]][:, None] + emit.log()[paths[:, 0][:, None], data[:, 0][None]]
    for t in range(1, T):
        lp = lp + trans.log()[paths[:, t - 1], paths[:, t]][:, None]
        lp = lp + emit.log()[paths[:, t][:, None], data[:, t][None]]
    log_px = lp.logsumexp(0)  # (S,)
    post = (lp - log_px).exp()  # (K^T, S)
    pair = torch.zeros(T, S, K, K)
    for t in range(1, T):
        idx = paths[:, t - 1] * K + paths[:, t]
        pair[t] = torch.zeros(K * K, S).index_add_(0, idx, post).T.reshape(S, K, K)
    return log_px, pair


def test_hmm_log_likelihood_and_pairwise_marginals():
    S, T, K, M = 3, 5, 3, 4
    data = torch.randint(M, (S, T))
    init = torch.tensor([0.5, 0.3, 0.2])
    trans = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    emit = torch.rand(K, M) + 0.2
    emit /= emit.sum(-1, keepdim=True)
    em = EM(hmm_model(trans, emit, init))
    log_px, pair = hmm_brute_force(data, init, trans, emit)
    assert em.evaluate_loss(data) == pytest.approx(-log_px.sum().item(), rel=1e-12)

    estep = em.e_step(data)
    nodes = estep.trace.nodes
    for t in range(1, T):
        w = packed.unpack(estep.weights[f"z_{t}"], estep.trace.symbol_to_dim)
        prev, cur = nodes[f"z_{t - 1}"]["infer"]["_enumerate_dim"], nodes[f"z_{t}"]["infer"]["_enumerate_dim"]
        # -> (S, K_prev, K_cur)
        w = w.movedim((prev, cur), (0, 1)).reshape(K, K, S).permute(2, 0, 1)
        torch.testing.assert_close(w, pair[t])
    post = em.posterior(data)
    for t in range(1, T):
        torch.testing.assert_close(post[f"z_{t}"], pair[t].sum(-2))
