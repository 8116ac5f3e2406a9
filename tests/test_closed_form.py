"""Closed-form M-steps: agreement with the gradient M-step for every family, the plan,
degenerate statistics, conjugate priors, and user-registered rules."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_em import EM, Rule, register_m_step
from pyro_em.rules import keep_old

K, N = 2, 120


def data_for(kind, g):
    z = torch.randint(K, (N,), generator=g)
    if kind == "categorical":
        return (z * 2 + torch.randint(2, (N,), generator=g)) % 4
    if kind == "onehot":
        return torch.nn.functional.one_hot((z * 2 + torch.randint(2, (N,), generator=g)) % 4, 4).double()
    if kind == "bernoulli":
        return (torch.rand(N, 3, generator=g) < 0.2 + 0.6 * z[:, None]).double()
    if kind == "binomial":
        return torch.binomial(torch.full((N,), 5.0), 0.2 + 0.6 * z.double(), generator=g)
    if kind == "beta":
        return torch.distributions.Beta(1.0 + 4.0 * z.double(), 5.0 - 3.0 * z.double()).sample()
    if kind == "gamma":
        return torch.distributions.Gamma(2.0 + 3.0 * z.double(), 1.0 + z.double()).sample()
    if kind in ("poisson", "exponential"):
        return torch.poisson(2.0 + 6.0 * z.double(), generator=g) + (kind == "exponential") * 0.5
    if kind in ("mvn", "normal"):
        return torch.randn(N, 2, generator=g) + 3.0 * z[:, None] + torch.tensor([0.0, 1.0])
    raise ValueError(kind)


# (data kind, emission as a function of the params and z, params: name -> (init, constraint))
P = constraints.positive
FAMILIES = {
    "categorical_probs": ("categorical", lambda p, z: dist.Categorical(p["emit"][z]),
                          {"emit": (torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]), constraints.simplex)}),
    "categorical_logits": ("categorical", lambda p, z: dist.Categorical(logits=p["emit"][z]),
                           {"emit": (torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]).log(), constraints.real)}),
    "onehot": ("onehot", lambda p, z: dist.OneHotCategorical(p["emit"][z]),
               {"emit": (torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]), constraints.simplex)}),
    "bernoulli_probs": ("bernoulli", lambda p, z: dist.Bernoulli(p["p"][z]).to_event(1),
                        {"p": (torch.tensor([[0.3, 0.4, 0.5], [0.6, 0.5, 0.7]]), constraints.unit_interval)}),
    "bernoulli_logits": ("bernoulli", lambda p, z: dist.Bernoulli(logits=p["p"][z]).to_event(1),
                         {"p": (torch.tensor([[-1.0, 0.0, 0.2], [0.5, 0.3, 1.0]]), constraints.real)}),
    "binomial": ("binomial", lambda p, z: dist.Binomial(5, p["p"][z]),
                 {"p": (torch.tensor([0.4, 0.6]), constraints.unit_interval)}),
    "poisson": ("poisson", lambda p, z: dist.Poisson(p["rate"][z]), {"rate": (torch.tensor([1.0, 5.0]), P)}),
    "exponential": ("exponential", lambda p, z: dist.Exponential(p["rate"][z]),
                    {"rate": (torch.tensor([1.0, 0.2]), P)}),
    "gamma": ("gamma", lambda p, z: dist.Gamma(p["a"][z], p["b"][z]),
              {"a": (torch.tensor([1.0, 3.0]), P), "b": (torch.tensor([1.0, 1.0]), P)}),
    "beta": ("beta", lambda p, z: dist.Beta(p["a"][z], p["b"][z]),
             {"a": (torch.tensor([1.5, 3.0]), P), "b": (torch.tensor([3.0, 1.5]), P)}),
    "normal": ("normal", lambda p, z: dist.Normal(p["loc"][z], p["scale"][z]).to_event(1),
               {"loc": (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), constraints.real),
                "scale": (torch.ones(K, 2), P)}),
    "normal_tied_scale": ("normal", lambda p, z: dist.Normal(p["loc"][z], p["scale"]).to_event(1),
                          {"loc": (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), constraints.real),
                           "scale": (torch.ones(2), P)}),
    "mvn_scale_tril": ("mvn", lambda p, z: dist.MultivariateNormal(p["loc"][z], scale_tril=p["L"][z]),
                       {"loc": (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), constraints.real),
                        "L": (torch.eye(2).expand(K, 2, 2).clone(), constraints.lower_cholesky)}),
    "mvn_covariance": ("mvn", lambda p, z: dist.MultivariateNormal(p["loc"][z], covariance_matrix=p["C"][z]),
                       {"loc": (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), constraints.real),
                        "C": (torch.eye(2).expand(K, 2, 2).clone(), constraints.positive_definite)}),
    "mvn_precision": ("mvn", lambda p, z: dist.MultivariateNormal(p["loc"][z], precision_matrix=p["Q"][z]),
                      {"loc": (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), constraints.real),
                       "Q": (torch.eye(2).expand(K, 2, 2).clone(), constraints.positive_definite)}),
    "mvn_tied": ("mvn", lambda p, z: dist.MultivariateNormal(p["loc"][z], scale_tril=p["L"]),
                 {"loc": (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), constraints.real),
                  "L": (torch.eye(2), constraints.lower_cholesky)}),
}


def mixture(emission, params):
    def model(data):
        w = pyro.param("weights", torch.tensor([0.4, 0.6]), constraint=constraints.simplex)
        p = {name: pyro.param(name, init.to(torch.get_default_dtype()), constraint=c) for name, (init, c) in params.items()}
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", emission(p, z), obs=data)

    return model


def comparable(name, value, family):
    """Logits are defined up to a shift; compare their normalized form."""
    if family.endswith("logits") and family.startswith("categorical"):
        return value - value.logsumexp(-1, keepdim=True)
    return value


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_closed_form_agrees_with_gradient(family):
    kind, emission, params = FAMILIES[family]
    data = data_for(kind, torch.Generator().manual_seed(1))
    results = {}
    for m_step in ("closed_form", "gradient"):
        pyro.clear_param_store()
        em = EM(mixture(emission, params), m_step=m_step)
        em.step(data)
        results[m_step] = {n: comparable(n, v.detach(), family) for n, v in pyro.get_param_store().items()}
    for name, value in results["closed_form"].items():
        torch.testing.assert_close(value, results["gradient"][name], atol=1e-5, rtol=1e-5, msg=name)


def test_gamma_with_shared_rate_converges_to_the_gradient_fixed_point():
    """A shared rate cannot be solved jointly with per-component concentrations: each
    concentration gets its exact update given the rate (an ECM step), which converges to
    the same maximum likelihood estimate as exact EM."""
    g = torch.Generator().manual_seed(1)
    z = torch.randint(2, (N,), generator=g).double()
    data = torch.distributions.Gamma(2.0 + 18.0 * z, 1.5).sample()  # one rate, two shapes
    params = {"a": (torch.tensor([1.0, 10.0]), P), "b": (torch.tensor(1.0), P)}
    results = {}
    for m_step in ("closed_form", "gradient"):
        pyro.clear_param_store()
        em = EM(mixture(lambda p, z: dist.Gamma(p["a"][z], p["b"]), params), m_step=m_step)
        assert em.fit(data, max_iter=2000, tol=1e-13).converged
        results[m_step] = {n: v.detach() for n, v in pyro.get_param_store().items()}
        if m_step == "closed_form":
            assert not any(u.joint for u in em.plan.closed_form["a"])
    for name, value in results["closed_form"].items():
        torch.testing.assert_close(value, results["gradient"][name], atol=1e-5, rtol=1e-5, msg=name)


def test_plan_mixes_closed_form_and_gradient_and_can_be_strict():
    net = torch.nn.Linear(2, 1).double()
    data = torch.randn(50, 2)

    def model(data):
        w = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", torch.randn(2, 2))
        pyro.module("net", net)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=data)
            pyro.sample("y", dist.Normal(net(data).squeeze(-1) + locs[z][..., 0], 1.0), obs=data[:, 0])

    em = EM(model)
    em.step(data)
    assert set(em.plan.closed_form) == {"weights"}
    assert set(em.plan.gradient) == {"locs", "net$$$weight", "net$$$bias"}
    assert "locs: gradient (enters site 'y' through a computation)" in str(em.plan)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="m_step='closed_form', but param 'locs' has no closed-form update"):
        EM(model, m_step="closed_form").step(data)
    assert "locs" not in pyro.get_param_store()  # the failed step left nothing behind


def test_param_shared_by_two_sites_pools_their_statistics():
    """One rate used by two Poisson sites: the MLE pools both sites' counts."""
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7.0, 9.0])

    def model():
        rate = pyro.param("rate", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("a", 3):
            pyro.sample("xa", dist.Poisson(rate), obs=a)
        with pyro.plate("b", 2):
            pyro.sample("xb", dist.Poisson(rate), obs=b)

    em = EM(model, m_step="closed_form")
    em.step()
    assert pyro.param("rate").item() == pytest.approx(22 / 5, rel=1e-12)


def test_component_without_data_keeps_its_parameters():
    data = torch.cat([torch.randn(30) - 2, torch.randn(30) + 2])

    def model(data):
        w = pyro.param("weights", torch.tensor([0.4, 0.4, 0.2]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-2.0, 2.0, 1e4]))
        scales = pyro.param("scales", torch.tensor([1.0, 1.0, 1.0]), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(locs[z], scales[z]), obs=data)

    em = EM(model, m_step="closed_form")
    for _ in range(3):
        em.step(data)
    for name in ("weights", "locs", "scales"):
        assert bool(torch.isfinite(pyro.param(name)).all())
    assert pyro.param("locs")[2].item() == 1e4 and pyro.param("scales")[2].item() == 1.0


def test_collapsed_covariance_is_a_clear_error_and_reg_covar_fixes_it():
    data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [10.0, 0.0]])  # collinear cluster

    def model(data):
        w = pyro.param("weights", torch.tensor([0.75, 0.25]), constraint=constraints.simplex)
        locs = pyro.param("locs", torch.tensor([[1.0, 1.0], [10.0, 0.0]]))
        L = pyro.param("L", torch.eye(2).expand(2, 2, 2).clone(), constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=L[z]), obs=data)

    em = EM(model)
    em.step(data)
    before = pyro.param("L").detach().clone()
    with pytest.raises(ValueError, match="not positive definite.*reg_covar"):
        for _ in range(5):
            em.step(data)
            before = pyro.param("L").detach().clone()
    assert torch.equal(pyro.param("L").detach(), before)
    pyro.clear_param_store()
    em = EM(model, reg_covar=1e-6)
    for _ in range(5):
        em.step(data)
    assert bool(torch.isfinite(pyro.param("L")).all())


@pytest.mark.parametrize(
    "likelihood, prior, init, data",
    [
        (lambda p: dist.Bernoulli(p), lambda: dist.Beta(3.0, 2.0), 0.5, [1.0, 0.0, 1.0, 1.0]),
        (lambda r: dist.Poisson(r), lambda: dist.Gamma(3.0, 2.0), 1.0, [4.0, 2.0, 7.0]),
        (lambda r: dist.Exponential(r), lambda: dist.Gamma(2.0, 1.0), 1.0, [0.5, 1.5, 0.2]),
        (lambda m: dist.Normal(m, 2.0), lambda: dist.Normal(1.0, 0.5), 0.0, [3.0, 4.0, 5.0]),
    ],
)
def test_conjugate_priors_give_the_closed_form_map(likelihood, prior, init, data):
    data = torch.tensor(data)

    def model():
        theta = pyro.sample("theta", prior())
        with pyro.plate("data", len(data)):
            pyro.sample("x", likelihood(theta), obs=data)

    from pyro.infer.autoguide.initialization import init_to_value

    results = {}
    for m_step in ("closed_form", "gradient"):
        pyro.clear_param_store()
        em = EM(model, m_step=m_step, init_loc_fn=init_to_value(values={"theta": torch.tensor(init)}))
        em.step()
        results[m_step] = pyro.param("AutoDelta.theta").item()
    assert results["closed_form"] == pytest.approx(results["gradient"], abs=1e-6)


class Rayleigh(dist.TorchDistribution):
    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive

    def __init__(self, scale, validate_args=None):
        self.scale = scale
        super().__init__(scale.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return Rayleigh(self.scale.expand(batch_shape))

    def log_prob(self, x):
        return (x / self.scale**2).log() - x**2 / (2 * self.scale**2)


def test_user_registered_rule():
    @register_m_step(Rayleigh, "scale")
    class RayleighScale(Rule):
        kind = "rayleigh_scale"

        def summarize(self, ctx):
            return {"sxx": ctx.pool(ctx.weight, ctx.value**2), "sw": ctx.pool(ctx.weight)}

        def solve(self, stats, old, ctx):
            return keep_old(old, (stats["sxx"] / (2 * stats["sw"])).sqrt(), stats["sw"])

    data = torch.cat([torch.rand(40) * 0.5 + 0.1, torch.rand(40) * 3 + 3])
    results = {}
    for m_step in ("closed_form", "gradient"):
        pyro.clear_param_store()

        def model(data):
            w = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
            s = pyro.param("s", torch.tensor([0.5, 2.0]), constraint=constraints.positive)
            with pyro.plate("data", len(data)):
                z = pyro.sample("z", dist.Categorical(w))
                pyro.sample("x", Rayleigh(s[z]), obs=data)

        em = EM(model, m_step=m_step)
        em.step(data)
        results[m_step] = pyro.param("s").detach()
    assert "s: closed form (RayleighScale at 'x')" in str(em.plan) or m_step == "gradient"
    torch.testing.assert_close(results["closed_form"], results["gradient"], atol=1e-6, rtol=0)


class _NormalWithOwnScaleRule(dist.Normal):
    """A Normal whose scale's rule the test below registers."""


def test_passes_follow_what_rules_declare_they_read():
    """The M-step's passes come from the rules' ``reads``: a Normal mixture's scales read the
    new means (a second pass); a rule that reads a param of its own pass without declaring it
    is a clear error naming the rule, with the params left as they were."""
    from pyro_em.rules import NormalScaleRule

    @register_m_step(_NormalWithOwnScaleRule, "scale")
    class Undeclared(NormalScaleRule):
        def reads(self, arg, joint):
            return ()

    data = torch.cat([torch.randn(30) - 2, torch.randn(30) + 2])
    for family, passes in ((dist.Normal, [["weights", "locs"], ["scales"]]), (_NormalWithOwnScaleRule, None)):
        pyro.clear_param_store()

        def model(data):
            w = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
            locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
            scales = pyro.param("scales", torch.ones(2), constraint=constraints.positive)
            with pyro.plate("data", len(data)):
                z = pyro.sample("z", dist.Categorical(w))
                pyro.sample("x", family(locs[z], scales[z]), obs=data)

        em = EM(model)
        if passes is not None:
            em.step(data)
            assert em.plan.passes == passes
            continue
        before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        with pytest.raises(TypeError, match="Undeclared reads argument 'loc' \\(param 'locs'.*reads\\(\\) must return 'loc'"):
            em.step(data)
        for name, value in pyro.get_param_store().items():
            assert torch.equal(value.detach(), before[name])


def test_shared_mean_with_per_component_covariance_falls_back_to_gradient():
    """Sum w x / sum w is not the maximizer when the covariance varies within a mean's slot."""
    data = torch.randn(40, 2)

    def model(data):
        w = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        loc = pyro.param("loc", torch.zeros(2))
        L = pyro.param("L", torch.eye(2) * torch.tensor([1.0, 3.0])[:, None, None], constraint=constraints.lower_cholesky)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.MultivariateNormal(loc, scale_tril=L[z]), obs=data)

    em = EM(model)
    em.step(data)
    assert set(em.plan.closed_form) == {"weights", "L"}
    assert "covariance varies within one of its mean's slots" in em.plan.gradient["loc"]
