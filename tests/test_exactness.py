"""Exactness on the ways people write models: masked latents under the gradient M-step, left-right
HMMs whose zeros stay exactly zero, integer counts and mixed precisions, per-datum weights."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn import hmm
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch.distributions import constraints

from pyro_em import EM


def categorical_hmm(init, param_space="simplex"):
    """Sequences along a plate, steps masked past each sequence's end, Categorical emissions:
    the layout of Pyro's examples/hmm.py, whose masked enumerated sites once met the gradient
    M-step with their packed dims in another order."""

    def model(X, lengths):
        kw = {"constraint": constraints.simplex} if param_space == "simplex" else {}
        start = pyro.param("start", init["start"].clone(), **kw)
        trans = pyro.param("trans", init["trans"].clone(), **kw)
        emit = pyro.param("emit", init["emit"].clone(), **kw)
        with pyro.plate("sequences", X.shape[0], dim=-1):
            z = None
            for t in pyro.markov(range(X.shape[1])):
                with poutine.mask(mask=t < lengths):
                    z = pyro.sample(f"z_{t}", dist.Categorical(start if z is None else trans[z]))
                    pyro.sample(f"x_{t}", dist.Categorical(emit[z]), obs=X[:, t])

    return model


def reference_fit(init, seqs, iters, **kw):
    """hmmlearn's CategoricalHMM from the same start, one Baum-Welch iteration at a time."""
    ref = hmm.CategoricalHMM(len(init["start"]), n_iter=1, tol=0, init_params="", params="ste", **kw)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = (init[k].numpy() for k in ("start", "trans", "emit"))
    X, lengths = torch.cat(seqs).numpy().reshape(-1, 1), [len(s) for s in seqs]
    out = []
    for _ in range(iters):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.fit(X, lengths)
        out.append({"start": ref.startprob_.copy(), "trans": ref.transmat_.copy(), "emit": ref.emissionprob_.copy()})
    return out


def padded(seqs):
    T = max(len(s) for s in seqs)
    return torch.stack([torch.cat([s, s.new_zeros(T - len(s))]) for s in seqs]), torch.tensor([len(s) for s in seqs])


def test_masked_chain_gradient_m_step_equals_closed_form_and_hmmlearn():
    """As many sequences as states (3 and 3), so a position-based mix-up of the packed dims would
    go unnoticed by shapes; every param takes the gradient M-step."""
    g = torch.Generator().manual_seed(0)
    K, M = 3, 4
    init = {
        "start": torch.tensor([0.5, 0.3, 0.2]),
        "trans": torch.softmax(torch.randn(K, K, generator=g), -1),
        "emit": torch.softmax(torch.randn(K, M, generator=g), -1),
    }
    seqs = [torch.randint(M, (n,), generator=g) for n in (9, 6, 8)]
    X, lengths = padded(seqs)
    expected = reference_fit(init, seqs, iters=3)
    for m_step in ("gradient", "closed_form"):
        pyro.clear_param_store()
        em = EM(categorical_hmm(init), m_step=m_step)
        for it in range(3):
            em.step(X, lengths)
            for name in ("start", "trans", "emit"):
                np.testing.assert_allclose(pyro.param(name).detach().numpy(), expected[it][name], atol=1e-8, rtol=0, err_msg=f"{m_step} {name}")


LEFT_RIGHT = {
    "start": torch.tensor([1.0, 0.0, 0.0, 0.0]),
    "trans": torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.7, 0.3, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]]),
    "emit": torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("param_space", ["simplex", "real"])
@pytest.mark.parametrize("path", ["fused", "traced"])
def test_left_right_hmm_zeros_stay_exactly_zero(path, param_space, dtype, monkeypatch):
    """hmmlearn's test_fit_left_right: a left-right chain's zero start and transition
    probabilities stay exactly zero, and the fit equals hmmlearn's."""
    if path == "traced":
        monkeypatch.setattr("pyro_em.em.fuse_chain", lambda *args: None)
    torch.set_default_dtype(dtype)
    init = {k: v.to(dtype) for k, v in LEFT_RIGHT.items()}
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n in (12, 9, 15):
        z, xs = 0, []
        for _ in range(n):
            xs.append(int(torch.multinomial(init["emit"][z].double(), 1, generator=g)))
            z = int(torch.multinomial(init["trans"][z].double(), 1, generator=g))
        seqs.append(torch.tensor(xs))
    X, lengths = padded(seqs)
    em = EM(categorical_hmm(init, param_space), m_step="closed_form")
    expected = reference_fit({k: v.double() for k, v in init.items()}, seqs, iters=5)
    for it in range(5):
        em.step(X, lengths)
        assert (em.fused_chain is not None) == (path == "fused")
        for name in ("start", "trans"):
            ours = pyro.param(name).detach()
            assert bool((ours[init[name] == 0] == 0).all()), name
            atol = 1e-8 if dtype == torch.float64 else 1e-5
            np.testing.assert_allclose(ours.double().numpy(), expected[it][name], atol=atol, rtol=0, err_msg=name)
