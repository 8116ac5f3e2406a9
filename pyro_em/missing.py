"""Observations with missing coordinates: ``EM(model, nan_policy="omit")``.

NaN entries of an observed site are missing at random and integrated out exactly, the
objective being the likelihood of what was observed (Dempster, Laird and Rubin 1977, section
4.1.3; Ghahramani and Jordan 1994 for mixtures):

* an elementwise family (``Normal``, ``Poisson``, ``Gamma``, ... under any plates and
  ``to_event``): a missing entry's density integrates to one, so it drops out; the site
  becomes the family masked to its observed entries, the NaNs replaced by a placeholder in
  the support that no term reads;
* ``MultivariateNormal`` (given by ``scale_tril``, ``covariance_matrix`` or
  ``precision_matrix``): :class:`MissingMultivariateNormal`, whose density is each row's
  observed coordinates' marginal, computed one missingness pattern at a time. Its closed-form
  M-step (:mod:`pyro_em.rules`) uses the conditional expectations of the missing coordinates
  given the observed ones and each completion of the latents, and their conditional
  covariance (:meth:`MissingMultivariateNormal.conditional`);
* any other family with a NaN entry is an error naming the site.
"""

import math
from typing import List, Tuple

import torch
from pyro.distributions import MultivariateNormal
from pyro.poutine.messenger import Messenger

from . import kernels

_PLACEHOLDERS = (0.0, 1.0, 0.5)


class MissingMultivariateNormal(MultivariateNormal):
    """A multivariate Normal observed on some coordinates of each row: the log density of a
    row is that of its observed coordinates' marginal (0 for a row with none). The missing
    coordinates of ``value`` hold placeholders, never read; ``observed`` (a bool tensor of
    ``value``'s shape) says which are which."""

    def __init__(self, loc: torch.Tensor, observed: torch.Tensor, **matrix: torch.Tensor):
        super().__init__(loc, validate_args=False, **matrix)  # (scale_tril, covariance_matrix or precision_matrix)
        self._observed = observed
        patterns, self._row_pattern = torch.unique(observed.reshape(-1, observed.shape[-1]), dim=0, return_inverse=True)
        self._patterns = patterns.tolist()
        self._row_pattern = self._row_pattern.reshape(observed.shape[:-1])

    def expand(self, batch_shape, _instance=None):
        loc = self.loc.expand(torch.Size(batch_shape) + self.event_shape)
        scale_tril = self._unbroadcasted_scale_tril.expand(torch.Size(batch_shape) + self.event_shape * 2)
        return MissingMultivariateNormal(loc, self._observed, scale_tril=scale_tril)

    def _by_pattern(self, value: torch.Tensor):
        """For each missingness pattern: its rows (a bool tensor over ``value``'s batch), the
        observed and missing coordinates, and the observed block's Cholesky factor with the
        deviations ``x_o - mu_o`` solved against it."""
        sigma = self._unbroadcasted_scale_tril @ self._unbroadcasted_scale_tril.mT
        for k, pattern in enumerate(self._patterns):
            o = [i for i, seen in enumerate(pattern) if seen]
            m = [i for i, seen in enumerate(pattern) if not seen]
            rows = self._row_pattern == k
            if not o:
                yield rows, o, m, sigma, None, None
                continue
            # (a row with every coordinate observed: the factor the distribution has)
            L = self._unbroadcasted_scale_tril if not m else torch.linalg.cholesky(sigma[..., o, :][..., :, o])
            diff = (value[..., o] - self.loc[..., o]).unsqueeze(-1)
            solved = torch.linalg.solve_triangular(L, diff, upper=False)  # L^-1 (x_o - mu_o)
            yield rows, o, m, sigma, L, solved

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        out = None
        for rows, o, m, sigma, L, solved in self._by_pattern(value):
            if L is None:
                lp = value.new_zeros(())
            else:
                lp = (-0.5 * solved.squeeze(-1).square().sum(-1) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                      - 0.5 * len(o) * math.log(2 * math.pi))
            out = torch.where(rows, lp, 0.0 if out is None else out)
        return out

    def conditional(self, value: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
        """The conditional moments of every row's missing coordinates given its observed ones,
        under this distribution: ``(mean, blocks)``. ``mean`` (``batch + (D,)``) is ``value``
        with each missing coordinate at ``mu_m + S_mo S_oo^-1 (x_o - mu_o)``; ``blocks`` is, per
        missingness pattern, its rows (a bool tensor over ``value``'s batch) and the
        conditional covariance ``S_mm - S_mo S_oo^-1 S_om`` on the missing block, 0 elsewhere
        (of the covariance's batch shape: the same for every row of the pattern)."""
        D = value.shape[-1]
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape) + (D,)
        mean, blocks = None, []
        for rows, o, m, sigma, L, solved in self._by_pattern(value):
            x = value.expand(shape).clone()
            c = torch.zeros_like(sigma)
            if m:
                index = torch.tensor(m, device=value.device)
                if L is None:
                    x[..., m] = self.loc.expand(shape)[..., m]
                    c = sigma
                else:
                    # S_mo S_oo^-1 = (L^-1 S_om)^T L^-1: both through the Cholesky factor.
                    A = torch.linalg.solve_triangular(L, sigma[..., o, :][..., :, m], upper=False)
                    x[..., m] = self.loc.expand(shape)[..., m] + (A.mT @ solved).squeeze(-1)
                    c[..., index.unsqueeze(-1), index] = sigma[..., m, :][..., :, m] - A.mT @ A
                blocks.append((rows, c))
            mean = torch.where(rows.unsqueeze(-1), x, 0.0 if mean is None else mean)
        return mean, blocks


kernels.register(MissingMultivariateNormal, lambda fn, value: None)  # (its own log_prob, not the MVN kernel)


class OmitNaN(Messenger):
    """Rewrites observed sites with NaN entries as described in :mod:`pyro_em.missing`.

    :raises ValueError: naming the site if its family cannot integrate a missing entry out.
    """

    def _pyro_sample(self, msg) -> None:
        value = msg["value"]
        if not msg["is_observed"] or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        missing = torch.isnan(value)
        if not bool(missing.any()):
            return
        fn, events = msg["fn"], 0
        while isinstance(fn, torch.distributions.Independent):
            events += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        if isinstance(fn, MultivariateNormal) and not isinstance(fn, MissingMultivariateNormal):
            observed = ~missing
            filled = torch.where(missing, 0.0, value)
            given = next(k for k in ("scale_tril", "covariance_matrix", "precision_matrix") if k in vars(fn))
            new = MissingMultivariateNormal(fn.loc, observed, **{given: vars(fn)[given]})
        elif fn.event_shape == ():
            observed = ~missing
            filled = value
            for placeholder in _PLACEHOLDERS:
                filled = torch.where(missing, placeholder, value)
                if bool(fn.support.check(filled).all()):
                    break
            new = fn.mask(observed)
        else:
            raise ValueError(
                f"Observed site '{msg['name']}' has NaN entries, which nan_policy='omit' "
                f"integrates out only for elementwise families and MultivariateNormal, not "
                f"{type(fn).__name__}: its missing entries have no closed-form marginal here. "
                "Drop the incomplete rows, or mask them with obs_mask / poutine.mask."
            )
        msg["fn"] = new.to_event(events) if events else new
        msg["value"] = filled
