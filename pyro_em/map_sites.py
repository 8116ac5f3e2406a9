"""Point (MAP) estimates of continuous latent sites, the way :class:`~pyro.infer.autoguide.AutoDelta` does."""

from typing import Callable

import pyro
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ._validation import MAP_FLAG


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
    """

    def __init__(self, init_loc_fn: Callable = init_to_median, prefix: str = "AutoDelta"):
        super().__init__()
        self.init_loc_fn = init_loc_fn
        self.prefix = prefix

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or site_is_subsample(msg) or fn.support.is_discrete:
            return
        value = pyro.param(
            f"{self.prefix}.{msg['name']}",
            lambda: self.init_loc_fn(msg).detach(),
            constraint=fn.support,
            event_dim=fn.event_dim,
        )
        msg["value"] = value
        msg["is_observed"] = True
        msg["infer"][MAP_FLAG] = True
