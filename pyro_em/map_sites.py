"""Point (MAP) estimates of continuous latent sites, the way :class:`~pyro.infer.autoguide.AutoDelta` does.

Two MAP objectives are offered (``map_space``):

* ``"constrained"`` (the default, as :class:`~pyro.infer.autoguide.AutoDelta`): maximize the
  prior density of the value itself, ``log p(theta)``. A Dirichlet, Beta or Gamma prior with a
  concentration below one has infinite density on the boundary, so there the objective may have
  no maximum: EM then stops with an error naming the site (see :func:`unbounded_prior_message`).
* ``"unconstrained"``: maximize the density of the value's unconstrained coordinates
  ``u = biject_to(support).inv(theta)``, that is ``log p(theta) + log |d theta / d u|`` (the mode
  a Laplace approximation uses). The log-Jacobian adds one pseudo-count to every Dirichlet
  component (stick-breaking's Jacobian is ``prod theta_k``), to both Beta counts (sigmoid:
  ``theta (1 - theta)``) and to a Gamma shape (exp: ``theta``), so the mode is bounded for any
  positive concentration and keeps a closed form: ``(counts + alpha) / sum``.
"""

from typing import Callable, Set

import pyro
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from ._validation import INTEGRATED_FLAG, MAP_FLAG, subsampled

MAP_SPACES = ("constrained", "unconstrained")


class UnconstrainedDensity(TorchDistribution):
    """A prior seen in unconstrained coordinates: ``log_prob(x) = base.log_prob(x) +
    log |J(x)|``, the log-Jacobian of ``biject_to(base.support)`` at ``x``."""

    arg_constraints = {}

    def __init__(self, base_dist):
        self.base_dist = base_dist
        self._transform = biject_to(base_dist.support)
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    def sample(self, sample_shape=torch.Size()):
        return self.base_dist.sample(sample_shape)

    def log_prob(self, value):
        u = self._transform.inv(value)
        log_j = self._transform.log_abs_det_jacobian(u, value)
        return self.base_dist.log_prob(value) + log_j


class MapMessenger(Messenger):
    """Replace each continuous latent sample site by a value held in Pyro's param store.

    A site that is neither observed nor discrete (e.g. ``weights ~ Dirichlet`` or
    ``locs ~ Normal`` in a model written for ``SVI + AutoDelta``) takes the value of the param
    ``"{prefix}.{site name}"``, constrained to the site's support and initialized by
    ``init_loc_fn(site)``. Its prior log density stays in the trace, so EM maximizes the
    posterior density of these values (MAP-EM). With the default prefix ``"AutoDelta"`` the
    values land where :class:`~pyro.infer.autoguide.AutoDelta` keeps them.

    :param init_loc_fn: a Pyro init strategy taking a site, such as
        :func:`~pyro.infer.autoguide.initialization.init_to_median` (the default) or
        :func:`~pyro.infer.autoguide.initialization.init_to_value`.
    :param prefix: prefix of the param names.
    :param map_space: ``"constrained"`` (the prior density of the value, as AutoDelta) or
        ``"unconstrained"`` (the density of its unconstrained coordinates; see the module
        docs).
    """

    def __init__(self, init_loc_fn: Callable = init_to_median, prefix: str = "AutoDelta", map_space: str = "constrained"):
        super().__init__()
        if map_space not in MAP_SPACES:
            raise ValueError(f"map_space must be one of {MAP_SPACES}, got {map_space!r}.")
        self.init_loc_fn = init_loc_fn
        self.prefix = prefix
        self.map_space = map_space
        self.read_unobserved: Set[str] = set()
        """Unobserved halves of ``obs_mask`` sites that a later site reads: MAP-estimated as
        continuous latents (the planner adds them; see :meth:`_pyro_sample`)."""
        self._observed = None  # the last observed site of this run: (name, value)

    def __enter__(self):
        self._observed = None  # (each run of the model starts afresh)
        return super().__enter__()

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if msg["is_observed"]:
            self._observed = (msg["name"], msg["value"])
            return
        if site_is_subsample(msg) or fn.support.is_discrete:
            return
        for f in msg["cond_indep_stack"]:  # (before pyro.param slices a value by the subsample)
            if subsampled(f):
                raise ValueError(
                    f"{subsampled(f)}, and the continuous latent site '{msg['name']}' inside it "
                    "takes one MAP value per datum, which EM estimates from all of the data at "
                    "once. Remove the subsampling and pass the data in full."
                )
        if self._unobserved_half(msg) and msg["name"] not in self.read_unobserved:
            # Pyro's obs_mask idiom: "x_observed", then "x_unobserved" over the masked-out
            # entries. Integrated out, they contribute log 1 = 0 to the observed data's
            # likelihood: a value in the support, masked out of every objective. Its value is a
            # leaf that requires grad, so the planner sees whether a later site reads it.
            transform = biject_to(fn.support)
            like = self._observed[1]
            dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
            unconstrained = torch.zeros(transform.inverse_shape(fn.shape()), dtype=dtype, device=like.device)
            msg["value"] = transform(unconstrained).detach().requires_grad_()
            msg["is_observed"] = True
            msg["mask"] = False
            msg["infer"][INTEGRATED_FLAG] = True
            return
        value = pyro.param(
            f"{self.prefix}.{msg['name']}",
            lambda: self._init(msg),
            constraint=fn.support,
            event_dim=fn.event_dim,
        )
        if self.map_space == "unconstrained":
            msg["fn"] = UnconstrainedDensity(fn)
        msg["value"] = value
        msg["is_observed"] = True
        msg["infer"][MAP_FLAG] = True

    def _unobserved_half(self, msg) -> bool:
        """Whether ``msg`` is the ``"{name}_unobserved"`` site of ``pyro.sample(name, ...,
        obs=..., obs_mask=...)``, right after its ``"{name}_observed"`` site."""
        name = msg["name"]
        return (name.endswith("_unobserved") and self._observed is not None
                and self._observed[0] == name[: -len("_unobserved")] + "_observed")

    def _init(self, msg) -> torch.Tensor:
        try:
            return self.init_loc_fn(msg).detach()
        except (NotImplementedError, RuntimeError, ValueError) as e:
            raise ValueError(_init_error(msg["name"], e)) from e


def _init_error(site: str, error: Exception) -> str:
    return (
        f"The MAP value of site '{site}' could not be initialized by init_loc_fn ({error}). Pass "
        f"EM(model, init_loc_fn=init_to_value(values={{'{site}': ...}})) or give the site a "
        "prior that can be sampled."
    )


def unbounded_prior_message(site: str, prior: str, param: str) -> str:
    """The error for a MAP objective without a maximum at ``site``."""
    return (
        f"The MAP objective of site '{site}' (param '{param}') has no maximum: its {prior} prior "
        "has a concentration below 1, whose density is infinite on the boundary, and the "
        "expected counts there are too small to outweigh it. Use EM(model, "
        "map_space='unconstrained') (the posterior mode in unconstrained coordinates, always "
        "bounded), raise the prior's concentration to at least 1, or mask the prior out."
    )


_BOUNDED_BELOW_ONE = {"Dirichlet": ("concentration",), "Gamma": ("concentration",), "Beta": ("concentration1", "concentration0")}


def check_map_bounded(trace, updated, prefix: str) -> None:
    """After a gradient M-step: a MAP value driven onto the boundary where its prior density is
    infinite (a Dirichlet, Beta or Gamma concentration below 1) means the MAP objective has no
    maximum; raise the error of :func:`unbounded_prior_message` (the caller restores the store).

    :param trace: the E-step's trace (its MAP sites and their priors).
    :param updated: names of the params the gradient M-step moved.
    """
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["infer"].get(MAP_FLAG) or site["mask"] is False:
            continue
        param = f"{prefix}.{name}"
        fn = site["fn"]
        if param not in updated or isinstance(fn, UnconstrainedDensity):
            continue
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        concentrations = [getattr(fn, a) for a in _BOUNDED_BELOW_ONE.get(type(fn).__name__, ())]
        if not any(bool((c < 1).any()) for c in concentrations):
            continue
        value = pyro.param(param).detach()
        # Near the edge: a positive value within sqrt(tiny) of 0; a probability within a few
        # eps of 0 or 1, where Pyro's clipped sigmoid and stick-breaking hold it (and Q goes
        # flat there, so the optimizer stops on a plateau of an objective that has no maximum).
        finfo = torch.finfo(value.dtype)
        edge = 4 * finfo.eps if type(fn).__name__ in ("Beta", "Dirichlet") else finfo.tiny ** 0.5
        at_edge = (value <= edge) | ((1 - value <= edge) if type(fn).__name__ == "Beta" else False)
        if bool(torch.as_tensor(at_edge).any()):
            raise ValueError(unbounded_prior_message(name, type(fn).__name__, param))
