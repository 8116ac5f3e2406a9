"""The E-step's log-density kernels equal the distributions' own log_prob, values and gradients."""

import pyro.distributions as dist
import pytest
import torch

from pyro_em import kernels


def random_tril(*shape):
    A = torch.randn(*shape)
    return torch.linalg.cholesky(A @ A.mT + torch.eye(shape[-1]))


@pytest.mark.parametrize(
    "loc_shape, tril_shape, x_shape",
    [
        ((5, 1, 3), (5, 1, 3, 3), (3000, 3)),  # per-component covariance, mixture layout
        ((5, 1, 3), (3, 3), (3000, 3)),  # tied covariance
        ((3,), (5, 1, 3, 3), (3000, 3)),  # shared mean
        ((4, 1, 1, 2), (4, 1, 1, 2, 2), (7, 1000, 2)),  # two data plates
        ((2, 3, 1, 2), (3, 1, 2, 2), (5000, 2)),  # two enumerated dims
        ((5, 1, 3), (5, 1, 3, 3), (10, 3)),  # small: generic path
        ((3000, 3), (3, 3), (3000, 3)),  # mean varies with the data: generic path
        ((5, 3), (5, 3, 3), (3000, 1, 3)),  # components last (a fused mixture's layout)
        ((4, 1, 5, 3), (5, 3, 3), (4, 600, 1, 3)),  # components on both sides: generic path
    ],
)
def test_mvn_kernel_matches_torch(loc_shape, tril_shape, x_shape):
    loc = torch.randn(loc_shape, requires_grad=True)
    L = random_tril(*tril_shape).requires_grad_()
    x = torch.randn(x_shape)
    fn = dist.MultivariateNormal(loc, scale_tril=L)
    expected = fn.log_prob(x)
    actual = kernels.log_prob(fn, x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-10)
    g_actual = torch.autograd.grad(actual.sum(), [loc, L])
    g_expected = torch.autograd.grad(expected.sum(), [loc, L])
    for a, e in zip(g_actual, g_expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("time_varying", [False, True])
def test_discrete_hmm_kernel_matches_pyro(time_varying):
    K, T = 3, 40
    trans = torch.randn((T, K, K) if time_varying else (K, K))
    fn = dist.DiscreteHMM(torch.randn(K), trans, dist.Normal(torch.randn(K), torch.rand(K) + 0.5))
    x = torch.randn(5, T)
    with torch.no_grad():
        torch.testing.assert_close(kernels.log_prob(fn, x), fn.log_prob(x), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    "probs_shape, x_shape, structural_zero",
    [
        ((10, 1, 64), (1797, 64), False),  # a Bernoulli mixture over images
        ((3, 4, 1, 5), (2000, 5), False),  # two enumerated dims
        ((4, 1, 1, 6), (7, 400, 6), False),  # two data plates
        ((10, 1, 64), (1797, 64), True),  # an exact 0: the elementwise kernel
        ((10, 1, 64), (20, 64), False),  # small: the generic path
        ((10, 64), (1797, 1, 64), False),  # components last
    ],
)
def test_bernoulli_pixels_kernel_matches_torch(probs_shape, x_shape, structural_zero):
    probs = torch.rand(probs_shape) * 0.9 + 0.05
    if structural_zero:
        probs[0, 0, 0] = 0.0
    x = torch.bernoulli(torch.full(x_shape, 0.4))
    if structural_zero:
        x[:, 0] = 0.0
    fn = dist.Bernoulli(probs).to_event(1)
    batch = torch.broadcast_shapes(fn.batch_shape, x.shape[:-1])
    fn = fn.expand(batch)  # as a plate would
    with torch.no_grad():
        actual = kernels.log_prob(fn, x)
        expected = dist.Bernoulli(probs.clamp(1e-300)).to_event(1).expand(batch).log_prob(x) if structural_zero else fn.log_prob(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "param_shape, x_shape",
    [
        ((10, 1, 16), (3000, 16)),  # a diagonal mixture
        ((3, 4, 1, 5), (2000, 5)),  # two enumerated dims
        ((4, 1, 1, 6), (7, 400, 6)),  # two data plates
        ((10, 1, 16), (20, 16)),  # small: the generic path
        ((8, 16), (3000, 1, 16)),  # components last
    ],
)
@pytest.mark.parametrize("family", ["normal", "poisson"])
def test_diagonal_normal_and_poisson_kernels_match_torch(family, param_shape, x_shape):
    """Diagonal Normals loop over components; Poisson counts are one matrix product. Data far
    from zero relative to the scales lose no digits (no expanded quadratic form)."""
    if family == "normal":
        loc = torch.randn(param_shape) * 3 + 1e4
        fn = dist.Normal(loc, torch.rand(param_shape) + 0.01).to_event(1)
        x = torch.randn(x_shape) + 1e4
    else:
        fn = dist.Poisson(torch.rand(param_shape) * 5 + 0.1).to_event(1)
        x = torch.poisson(torch.full(x_shape, 2.0))
    batch = torch.broadcast_shapes(fn.batch_shape, x.shape[:-1])
    fn = fn.expand(batch)
    with torch.no_grad():
        actual, expected = kernels.log_prob(fn, x), fn.log_prob(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-9)
    loc = torch.randn(param_shape, requires_grad=True)  # under autograd (Q's trace) too
    fn = dist.Normal(loc, 1.0).to_event(1).expand(batch) if family == "normal" else dist.Poisson(loc.exp()).to_event(1).expand(batch)
    x = torch.randn(x_shape) if family == "normal" else x
    actual, expected = kernels.log_prob(fn, x), fn.log_prob(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-9)
    grads = [torch.autograd.grad(v.sum(), loc, retain_graph=True)[0] for v in (actual, expected)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-9)


def test_feature_major_copy_follows_the_data():
    """The transposed copy of the data is reused only for the same data, unchanged: a change in
    place, another tensor, another view of the same storage, and a freed tensor all miss;
    outside a memo scope nothing is kept."""
    from pyro_em import memo

    x = torch.randn(50, 3)
    assert kernels.feature_major(x) is not kernels.feature_major(x)
    store: dict = {}
    with memo.scope(store):
        first = kernels.feature_major(x.reshape(-1, 3))
        assert torch.equal(first, x.T) and kernels.feature_major(x.reshape(-1, 3)) is first
        x.add_(1.0)
        assert torch.equal(kernels.feature_major(x), x.T)
        assert torch.equal(kernels.feature_major(x[10:]), x[10:].T)
        y = x.clone()
        assert torch.equal(kernels.feature_major(y), y.T)
        assert store
        del y
        assert not store  # the copy goes with its data


def test_a_mixture_evaluated_after_its_data_changed_in_place():
    """An E-step on data changed in place since the last one uses the new values (the kernels'
    cached copy of the data follows the change), as one on a fresh copy of them does."""
    import pyro
    from pyro_em import EM

    g = torch.Generator().manual_seed(0)
    data = torch.randn(10_000, 2, generator=g) + 3 * torch.randint(2, (10_000, 1), generator=g)

    @pyro.infer.config_enumerate
    def model(x):
        locs = pyro.param("locs", torch.tensor([[0.0, 0.0], [3.0, 3.0]]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("x", dist.MultivariateNormal(locs[z], torch.eye(2)), obs=x)

    em = EM(model)
    em.step(data)
    data.mul_(-1.0)
    assert em.evaluate_loss(data) == pytest.approx(em.evaluate_loss(data.clone()), rel=1e-12)
