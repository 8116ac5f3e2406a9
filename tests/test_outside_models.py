"""Models written outside Pyro's repository, as their authors wrote them (translated where
they were written for NumPyro), on small synthetic data: EM fits each, never raises its loss,
and its loss equals ``TraceEnum_ELBO``'s with an ``AutoDelta`` guide at the same params to
1e-9, or it stops with a clear error naming the site and the fix.

Sources:

* NumPyro's example "Bayesian Models of Annotation" (``examples/annotation.py`` of the NumPyro
  repository; Paun et al. 2018, figures 1 to 3): the multinomial, Dawid-Skene and MACE models,
  ``numpyro`` -> ``pyro``, ``jnp`` -> ``torch`` (MACE's one-hot as NumPyro's later version
  writes it, ``s[..., None] == 0``).
* Course material, amcpherson/pyro_tutorial ``notebooks/gmm_model_answer_key.md``: a 1-D
  Gaussian mixture with MAP weights, scale and locs, and its 2-D variants with
  component-specific variances (``locs.swapaxes(-1, -2)[assignment]``,
  ``scale[assignment, None]``) and dimension-specific variances, with the notebook's
  ``init_loc_fn``.
* A blog post, sagar87.github.io ``_posts/2020-06-21-config_enumerate.md`` (MacKay's urns):
  ``urn ~ Categorical(u)``, ``Binomial(10, urn / 10)``, ``u ~ Dirichlet(1)``.
* A user script found in public code, "Example hidden Markov model obtained from chatGPT":
  a 3-state HMM written as a Python loop with no ``pyro.markov``, each state marked
  ``infer={"enumerate": "parallel"}``, a uniform ``z_start``.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex

from pyro_em import EM, CollapseWarning
from test_pyro_models import traceenum_loss


def _fit_and_compare(model, args, max_plate_nesting, steps=30, **em_kwargs):
    em = EM(model, max_plate_nesting=max_plate_nesting, **em_kwargs)
    losses = [em.step(*args) for _ in range(steps)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:])), losses
    loss = em.evaluate_loss(*args)
    assert loss == pytest.approx(traceenum_loss(model, args, {}, max_plate_nesting), rel=1e-9)
    return em, losses + [loss]


# ---- NumPyro's annotation models (Paun et al. 2018) ----------------------------------------


def annotation_data(num_items=60, num_positions=5, num_classes=3):
    """Items with a true class, each labelled by ``num_positions`` annotators who err."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(num_classes, (num_items,), generator=g)
    annotators = torch.arange(num_positions)
    accuracy = torch.linspace(0.9, 0.5, num_positions)
    right = torch.rand(num_items, num_positions, generator=g) < accuracy
    noise = torch.randint(num_classes, (num_items, num_positions), generator=g)
    return annotators, torch.where(right, truth.unsqueeze(-1), noise)


def multinomial(annotations):
    num_classes = int(annotations.max()) + 1
    num_items, num_positions = annotations.shape

    with pyro.plate("class", num_classes):
        zeta = pyro.sample("zeta", dist.Dirichlet(torch.ones(num_classes)))

    pi = pyro.sample("pi", dist.Dirichlet(torch.ones(num_classes)))

    with pyro.plate("item", num_items, dim=-2):
        c = pyro.sample("c", dist.Categorical(pi))

        with pyro.plate("position", num_positions):
            pyro.sample("y", dist.Categorical(zeta[c]), obs=annotations)


def dawid_skene(annotators, annotations):
    num_annotators = int(annotators.max()) + 1
    num_classes = int(annotations.max()) + 1
    num_items, num_positions = annotations.shape

    with pyro.plate("annotator", num_annotators, dim=-2):
        with pyro.plate("class", num_classes):
            beta = pyro.sample("beta", dist.Dirichlet(torch.ones(num_classes)))

    pi = pyro.sample("pi", dist.Dirichlet(torch.ones(num_classes)))

    with pyro.plate("item", num_items, dim=-2):
        c = pyro.sample("c", dist.Categorical(pi))

        with pyro.plate("position", annotations.shape[-1]):
            pyro.sample("y", dist.Categorical(Vindex(beta)[annotators, c, :]), obs=annotations)


def test_annotation_multinomial_model():
    _, annotations = annotation_data()
    em, _ = _fit_and_compare(config_enumerate(multinomial), (annotations,), 2)
    assert "AutoDelta.zeta: closed form" in str(em.plan) and "AutoDelta.pi: closed form" in str(em.plan)


def test_annotation_dawid_skene_model():
    """Pyro's init_to_median starts every confusion row at the uniform mean: a symmetric point
    that EM cannot leave (it converged there in a few steps, silently). The fit says so; from
    sampled starts it finds the annotators' confusions, with a lower loss."""
    from pyro.infer.autoguide.initialization import init_to_sample

    from pyro_em import SymmetryWarning

    annotators, annotations = annotation_data()
    model = config_enumerate(dawid_skene)
    with pytest.warns(SymmetryWarning, match="symmetric point.*'AutoDelta.beta'.*init_to_sample"):
        symmetric = EM(model, max_plate_nesting=2).fit(annotators, annotations, max_iter=200)
    pyro.clear_param_store()
    em, losses = _fit_and_compare(model, (annotators, annotations), 2, steps=60, init_loc_fn=init_to_sample)
    assert "AutoDelta.beta: closed form" in str(em.plan)
    assert losses[-1] < symmetric.loss - 10
    beta = pyro.param("AutoDelta.beta").detach()
    assert (beta[0].max(-1).values > 0.6).all()  # the most accurate annotator: a sharp confusion


def mace(annotators, annotations):
    num_annotators = int(annotators.max()) + 1
    num_classes = int(annotations.max()) + 1
    num_items, num_positions = annotations.shape

    with pyro.plate("annotator", num_annotators):
        epsilon = pyro.sample("epsilon", dist.Dirichlet(torch.full((num_classes,), 10.0)))
        theta = pyro.sample("theta", dist.Beta(0.5, 0.5))

    with pyro.plate("item", num_items, dim=-2):
        # NB: using constant logits for discrete uniform prior
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(num_classes)))

        with pyro.plate("position", num_positions):
            s = pyro.sample("s", dist.Bernoulli(1 - theta[annotators]))
            probs = torch.where(s[..., None] == 0, torch.nn.functional.one_hot(c, num_classes), epsilon[annotators])
            pyro.sample("y", dist.Categorical(probs), obs=annotations)


def test_annotation_mace_model():
    """MACE (Paun et al.'s figure 3): a spamming indicator per label, enumerated with the true
    class. Its Beta(0.5, 0.5) prior on an annotator's trustworthiness has infinite density at
    1, where the most accurate annotator's MAP value runs: no maximum. Pyro's clipped sigmoid
    held the value at 1 - eps, where Q is flat, and the fit stopped there silently. Now the
    clear error; in unconstrained coordinates the mode exists and EM climbs to it."""
    annotators, annotations = annotation_data()
    model = config_enumerate(mace)
    with pytest.raises(ValueError, match="MAP objective of site 'theta' .* no maximum: its Beta prior .* map_space='unconstrained'"):
        for _ in range(30):
            EM(model, max_plate_nesting=2).step(annotators, annotations)
    pyro.clear_param_store()
    em = EM(model, max_plate_nesting=2, map_space="unconstrained")
    losses = [em.step(annotators, annotations) for _ in range(30)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))
    theta = pyro.param("AutoDelta.theta").detach()
    assert ((theta > 0) & (theta < 1 - 1e-6)).all()
    assert "AutoDelta.theta: gradient" in str(em.plan)


# ---- course material: Gaussian mixtures with MAP sites (amcpherson/pyro_tutorial) -----------


def _course_init(data, K):
    def init_loc_fn(site):
        if site["name"] == "weights":
            return torch.ones(K) / K
        if site["name"] == "scale":
            return (data.var() / 2).sqrt() * torch.ones(site["fn"].shape())
        if site["name"] == "locs":
            picked = data[torch.multinomial(torch.ones(len(data)) / len(data), K)]
            return picked.mT if picked.dim() == 2 and site["fn"].shape() == picked.mT.shape else picked
        raise ValueError(site["name"])

    return init_loc_fn


def gmm_1d(data=None, n_data=None, K=2):
    assert (data is None) != (n_data is None)
    if n_data is None:
        n_data = data.shape[0]

    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))

    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 4.0))

    with pyro.plate("data", n_data):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm_2d_component_variance(data=None, n_data=None, K=3, D=2):
    assert (data is None) != (n_data is None)
    if n_data is None:
        n_data = data.shape[0]

    weights = pyro.sample("weights", dist.Dirichlet(1.0 * torch.ones(K)))

    dims = pyro.plate("dims", D, dim=-2)
    components = pyro.plate("components", K, dim=-1)

    with components:
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
        with dims:
            locs = pyro.sample("locs", dist.Normal(0.0, 4.0))

    with pyro.plate("data", n_data):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs.swapaxes(-1, -2)[assignment], scale[assignment, None]).to_event(1), obs=data)


def gmm_2d_dimension_variance(data=None, n_data=None, K=3, D=2):
    assert (data is None) != (n_data is None)
    if n_data is None:
        n_data = data.shape[0]

    weights = pyro.sample("weights", dist.Dirichlet(1.0 * torch.ones(K)))

    dims = pyro.plate("dims", D, dim=-2)
    components = pyro.plate("components", K, dim=-1)

    with dims:
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))

    with components:
        with dims:
            locs = pyro.sample("locs", dist.Normal(0.0, 4.0))

    with pyro.plate("data", n_data):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs.swapaxes(-1, -2)[assignment], scale.swapaxes(-1, -2)).to_event(1), obs=data)


def _clusters(D):
    centres = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, -2.0]])[:, :D]
    g = torch.Generator().manual_seed(1)
    data = torch.cat([c + torch.randn(40, D, generator=g) * s for c, s in zip(centres, (0.5, 1.0, 1.5))])
    return data.squeeze(-1) if D == 1 else data


@pytest.mark.parametrize("model, D, K", [(gmm_1d, 1, 2), (gmm_2d_component_variance, 2, 3), (gmm_2d_dimension_variance, 2, 3)])
def test_course_gaussian_mixtures(model, D, K):
    data = _clusters(D)
    em, losses = _fit_and_compare(config_enumerate(model), (data,), 2 if D == 2 else 1,
                                  init_loc_fn=_course_init(data, K))
    assert losses[-1] < losses[0]


# ---- a blog post: MacKay's urns ---------------------------------------------------------------


@config_enumerate
def urns(y):
    u = pyro.sample("u", pyro.distributions.Dirichlet(torch.ones(10)))
    with pyro.plate("data", y.shape[0]):
        urn = pyro.sample("urn", pyro.distributions.Categorical(u))
        pyro.sample("obs", pyro.distributions.Binomial(10, urn / 10), obs=y)


def test_blog_urns():
    """Draws from urn 6: the MAP urn probabilities (Dirichlet(1): plain counts) put their
    mass on the urns that explain the draws; urn 0 (no black ball) explains none."""
    draws = torch.tensor([8.0, 3.0, 6.0, 5.0, 6.0, 6.0, 7.0, 6.0, 9.0, 7.0])
    with pytest.warns(CollapseWarning, match="'AutoDelta.u'"):  # (urns no draw can come from)
        EM(urns).fit(draws, max_iter=300)
    u = pyro.param("AutoDelta.u").detach()
    assert float(u[0]) == 0.0 and int(u.argmax()) == 6
    em, _ = _fit_and_compare(urns, (draws,), 1, steps=3)


# ---- a user script: an HMM written as a plain loop --------------------------------------------


num_states = 3


def chatgpt_hmm(data):
    transition_probs = pyro.param("transition_probs", torch.ones(num_states, num_states) / num_states,
                                  constraint=dist.constraints.simplex)
    emission_locs = pyro.param("emission_locs", torch.linspace(-2, 2, num_states))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)

    z_prev = pyro.sample("z_start", dist.Categorical(torch.ones(num_states) / num_states),
                         infer={"enumerate": "parallel"})

    for t in range(len(data)):
        z_t = pyro.sample(f"z_{t}", dist.Categorical(transition_probs[z_prev]),
                          infer={"enumerate": "parallel"})
        pyro.sample(f"x_{t}", dist.Normal(emission_locs[z_t], sigma), obs=data[t])
        z_prev = z_t


def test_user_script_hmm_without_markov():
    g = torch.Generator().manual_seed(0)
    trans = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5]])
    z, xs = 0, []
    for _ in range(10):
        z = int(torch.multinomial(trans[z], 1, generator=g))
        xs.append(float(torch.tensor([-3.0, 0.0, 3.0])[z] + 0.5 * torch.randn((), generator=g)))
    data = torch.tensor(xs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)  # (10 steps: some transitions never seen)
        em, losses = _fit_and_compare(chatgpt_hmm, (data,), 0, steps=50)
    assert "transition_probs: closed form" in str(em.plan)
