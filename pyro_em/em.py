"""The EM driver: SVI's ``step`` / ``evaluate_loss`` shape, plus ``fit`` and ``posterior``."""

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import pyro
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.optim import PyroOptim

from ._validation import check_fit_args
from .chain import FusedChain
from .closed_form import MStepPlan
from .estep import EStep
from .gradient import GradientMStep
from .hmm import ALGORITHMS
from .map_sites import MapMessenger
from .loop import EMResult, MStepWarning, fit_loop
from .squarem import Squarem
from .missing import OmitNaN
from .information import Covariance, observed_covariance
from .interrupts import guarded
from .planner import Planner, rollback_new_params, rows
from . import iteration, restarts, selection
from .posterior import site_marginals

logger = logging.getLogger("pyro_em")
M_STEPS = ("auto", "closed_form", "gradient")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _guarded(method: Callable) -> Callable:
    """A public method whose exceptions, a ``KeyboardInterrupt`` at any point above all, leave
    Pyro's and PyTorch's process-wide state as it was (:func:`~pyro_em.interrupts.guarded`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with guarded():
            return method(self, *args, **kwargs)

    return wrapper


def _accepts_numpy(method: Callable) -> Callable:
    """Let a method take numpy arrays wherever the model takes tensors: each array becomes a
    tensor sharing its memory (the same tensor for the same array, so plans are reused); and
    guard it as :func:`_guarded` does."""

    @_guarded
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        cache = {}

        def convert(a):
            if isinstance(a, np.ndarray):
                cached = self._numpy_tensors.get(id(a))
                cache[id(a)] = cached if cached is not None and cached[0] is a else (a, torch.as_tensor(a))
                return cache[id(a)][1]
            return a

        args = tuple(convert(a) for a in args)
        kwargs = {k: convert(v) for k, v in kwargs.items()}
        if cache:
            self._numpy_tensors = cache
        return method(self, *args, **kwargs)

    return wrapper


class EM:
    """Expectation-Maximization for a Pyro model with discrete latent variables.

    ``EM(model)`` takes the place of ``SVI(model, guide, optim, TraceEnum_ELBO())``: no guide is
    needed. Each :meth:`step` runs an exact E-step (every discrete latent site is summed out by
    Pyro's parallel enumeration, marks made with :func:`~pyro.infer.enum.config_enumerate` are
    kept) and an M-step that maximizes the expected complete-data log likelihood ``Q`` over all
    ``pyro.param`` parameters. Continuous latent sites that are not observed are estimated as
    MAP point values held in the param store (see :class:`~pyro_em.map_sites.MapMessenger`), so
    a model written for ``SVI + AutoDelta + TraceEnum_ELBO`` runs unchanged. Fitted values live
    in Pyro's param store, as after SVI.

    The loss is the negative log marginal likelihood of the observations, summed over data,
    plus the negative log prior density of MAP-estimated sites.

    :param model: a Pyro model (a callable with ``pyro.sample`` and ``pyro.param`` statements).
    :param m_step: how parameters are updated. ``"auto"`` (the default): every param that
        enters a distribution directly (itself, or indexed by enumerated latents such as
        ``locs[z]`` or ``trans[z_prev]``, possibly broadcast) and has a registered rule
        (:mod:`pyro_em.rules`) gets its exact weighted maximum-likelihood (or conjugate MAP)
        update; the others take the gradient M-step, in the same step. ``"closed_form"``:
        like auto, but a param without a closed form is an error naming it. ``"gradient"``:
        the gradient M-step for all. See :attr:`plan`.
    :param optim: ``None`` to maximize ``Q`` to convergence by L-BFGS (exact EM), or a
        :class:`pyro.optim.PyroOptim` for ``num_steps`` gradient steps (generalized EM).
    :param num_steps: inner gradient steps per M-step with ``optim``; the L-BFGS iteration cap
        otherwise (default 100).
    :param max_plate_nesting: the number of nested plates in the model; guessed by running
        the model once if ``None``.
    :param init_loc_fn: Pyro init strategy for MAP-estimated sites (default
        :func:`~pyro.infer.autoguide.initialization.init_to_median`).
    :param map_prefix: prefix of the param names of MAP-estimated sites.
    :param map_space: the MAP objective of those sites. ``"constrained"`` (the default):
        their prior density, as with an ``AutoDelta`` guide, so the loss equals
        ``TraceEnum_ELBO``'s; a Dirichlet, Beta or Gamma prior with a concentration below 1 can
        make it unbounded, and EM then raises an error naming the site. ``"unconstrained"``:
        the density of their unconstrained coordinates (prior times the Jacobian of
        ``biject_to(support)``, the mode a Laplace approximation uses), bounded for any
        positive concentration; conjugate priors still update in closed form, with one more
        pseudo-count (see :mod:`pyro_em.map_sites`).
    :param reg_covar: non-negative number added to every variance and covariance diagonal by
        the closed-form updates (scikit-learn's ``reg_covar``; default 0, plain maximum
        likelihood).
    :param temperature: ``1`` (the default) for EM: the E-step weighs every completion of the
        latents by its posterior probability. ``0`` for hard EM: the E-step takes the joint
        MAP completion alone (a max-product contraction, as ``infer_discrete(temperature=0)``;
        Viterbi training for a ``pyro.markov`` chain), the M-step is unchanged, and the loss is
        minus the log joint density of that completion. With fixed equal weights and one fixed
        spherical scale this is Lloyd's k-means.
    :param jit: ``True`` (the default): the model is planned once per batch of data, and
        later steps run without running the Python model again, as Pyro's
        ``JitTraceEnum_ELBO`` does: a plain mixture or a recognized ``pyro.markov`` chain steps
        as one fused forward-backward pass (:attr:`fused_chain`), and a step's tensor
        operations are captured once as a graph (``make_fx``) that later steps run
        (:mod:`pyro_em.program`; the design page of the docs). The model must then be a pure
        function of its params and data: its side effects happen only when it runs, and its
        sites, shapes and plates must not depend on param values. With Pyro's validation on
        (its default), :meth:`fit` runs the model once more at the end and raises if its
        structure changed. ``False``: the model runs at every step (and every evaluation of
        ``Q``), slower, for models with side effects or whose structure may change; a
        structure change is then an error at the step where it happens.
    :param compile: ``False`` (the default): captured graphs run as ``torch.fx`` graph
        modules. ``True`` or a :func:`torch.compile` mode (``"default"``,
        ``"reduce-overhead"`` for CUDA graphs, ``"max-autotune"``,
        ``"max-autotune-no-cudagraphs"``): they are compiled (inductor: fused kernels), at a
        cost of seconds at the first step that runs each graph; worth it for long fits on
        large data, or on a GPU.
    :param hmm_algorithm: the forward-backward algorithm of ``pyro.markov`` chains and
        ``DiscreteHMM`` sites: ``None`` (the default) to choose per call
        (:func:`pyro_em.hmm.choose_algorithm`), or ``"sequential"``, ``"blocked"`` or
        ``"parallel"``.
    :param accelerate: ``None`` (the default): :meth:`fit` and :meth:`fit_batches` take plain
        EM steps. ``"squarem"``: each of their iterations is a SQUAREM cycle (Varadhan and
        Roland 2008, :mod:`pyro_em.squarem`): two EM steps, an extrapolation along them in the
        params' unconstrained coordinates, and a stabilizing EM step, falling back to plain EM
        where the extrapolated point's loss is worse. On fits that crawl (overlapping
        components, a flat ridge) it reaches the optimum in a fraction of plain EM's E-steps
        (:attr:`EMResult.n_e_steps`); each cycle's loss is never above the previous one.
    :param nan_policy: what NaN entries of an observed site mean. ``"raise"`` (the default):
        an error naming the site. ``"omit"`` (scipy's name): they are missing at random and
        integrated out exactly (:mod:`pyro_em.missing`): an entry of an elementwise family
        (``Normal``, ``Poisson``, ... under any plates and ``to_event``) drops out; a
        ``MultivariateNormal`` row is scored by its observed coordinates' marginal, and its
        closed-form M-step uses the missing coordinates' conditional moments; NaN entries of
        any other family are an error naming the site.
    :raises TypeError: if a guide is passed (``EM(model, guide)``, ``EM(model, guide=g)``,
        ``EM(AutoDelta(model))``): EM needs the model alone; or an unknown keyword argument.
    :raises ValueError: if an option is out of range.

    **Missing observations.** Pyro's ``pyro.sample(name, fn, obs=x, obs_mask=mask)`` makes two
    sites, ``name_observed`` and ``name_unobserved``. EM's objective is the likelihood of the
    observed data (Dempster, Laird and Rubin's), so the unobserved entries are integrated
    out: where no other site reads them, their density integrates to one and drops out of the
    loss and of every update (``print(em.plan)`` says "integrated out"). Where a later site
    reads them (an autoregressive series with gaps), they are continuous latents, estimated
    as MAP values under ``"AutoDelta.name_unobserved"`` as any other, and the plan says so.
    This differs from ``TraceEnum_ELBO`` with an ``AutoDelta`` guide, which point-estimates
    every unobserved entry and counts its density: that objective's maximum biases scales
    downwards (the entries sit at their mean).

    Example::

        @pyro.infer.config_enumerate
        def model(data):
            weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
            locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
            with pyro.plate("data", len(data)):
                z = pyro.sample("z", dist.Categorical(weights))
                pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)

        em = EM(model)
        result = em.fit(data, max_iter=200, tol=1e-8)
        responsibilities = em.posterior(data)["z"]   # shape (len(data), 2)
    """

    _subsample = False  # plates that subsample are for stepwise EM (OnlineEM)

    def __init__(
        self,
        model: Callable,
        *guide: Callable,
        m_step: str = "auto",
        optim: Optional[PyroOptim] = None,
        num_steps: Optional[int] = None,
        max_plate_nesting: Optional[int] = None,
        init_loc_fn: Callable = init_to_median,
        map_prefix: str = "AutoDelta",
        map_space: str = "constrained",
        reg_covar: float = 0.0,
        temperature: int = 1,
        jit: bool = True,
        compile: Union[bool, str] = False,
        hmm_algorithm: Optional[str] = None,
        accelerate: Optional[str] = None,
        nan_policy: str = "raise",
        **unknown: Any,
    ):
        if "guide" in unknown:
            guide = (unknown.pop("guide"),)
        if unknown:
            raise TypeError(f"EM() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}.")
        if guide or isinstance(model, AutoGuide):
            raise TypeError(
                "EM takes the model alone, without a guide: EM(model), where SVI took "
                "SVI(model, guide, optim, TraceEnum_ELBO()). Discrete latents are summed out "
                "exactly and continuous latent sites are estimated as an AutoDelta guide would."
            )
        if m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {m_step!r}.")
        if max_plate_nesting is not None and (
            not isinstance(max_plate_nesting, int) or max_plate_nesting < 0
        ):
            raise ValueError(
                f"max_plate_nesting must be a non-negative integer or None, got "
                f"{max_plate_nesting!r}."
            )
        if not isinstance(reg_covar, (int, float)) or isinstance(reg_covar, bool) or not reg_covar >= 0:
            raise ValueError(f"reg_covar must be a number >= 0, got {reg_covar!r}.")
        if temperature not in (0, 1) or isinstance(temperature, bool):
            raise ValueError(f"temperature must be 1 (EM) or 0 (hard EM), got {temperature!r}.")
        if not isinstance(jit, bool):
            raise ValueError(f"jit must be True or False, got {jit!r}.")
        if not (isinstance(compile, bool) or compile in COMPILE_MODES):
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}.")
        if hmm_algorithm is not None and hmm_algorithm not in ALGORITHMS:
            raise ValueError(f"hmm_algorithm must be None or one of {ALGORITHMS}, got {hmm_algorithm!r}.")
        if accelerate not in (None, "squarem"):
            raise ValueError(f"accelerate must be None or 'squarem', got {accelerate!r}.")
        self.model = model
        self.accelerate = accelerate
        self._e_steps = 0  # (EM iterations run, for EMResult.n_e_steps)
        self.reg_covar = float(reg_covar)
        self.hmm_algorithm = hmm_algorithm
        self.m_step = m_step
        self.map_prefix = map_prefix
        if nan_policy not in ("raise", "omit"):
            raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}.")
        self.nan_policy = nan_policy
        fitted = OmitNaN()(model) if nan_policy == "omit" else model
        self._planner = Planner(fitted, MapMessenger(init_loc_fn, map_prefix, map_space), m_step, max_plate_nesting,
                                temperature, jit, compile, self._subsample)
        self.fitted_model = self._planner.fitted_model
        """``model`` with MAP-estimated sites fixed to their values in the param store: a
        plain Pyro model for :func:`~pyro.infer.infer_discrete`, ``Predictive`` and the like."""
        self._online: Optional[iteration.Online] = None
        self._gradient_m_step = GradientMStep(optim, num_steps)
        self._numpy_tensors: Dict[int, tuple] = {}
        self.stalled: List[str] = []
        """Params the last step's gradient M-step could not move although Q's gradient in
        them is not small (see :class:`MStepWarning`)."""

    @property
    def plan(self) -> Optional[MStepPlan]:
        """How each param is updated (an :class:`~pyro_em.closed_form.MStepPlan`; print it),
        made at the first :meth:`step` and again when the model's arguments change; its
        printout ends with how the batch's steps run (the E-step backend, and whether its
        programs run as captured graphs or in Python, and why)."""
        return self._planner.plan

    @property
    def fused_chain(self) -> Optional[FusedChain]:
        """The ``pyro.markov`` chain (or plain mixture, a chain of length one) that steps run
        as one DiscreteHMM, without tracing the model, if the plan recognized one (see
        :mod:`pyro_em.chain`); else ``None``."""
        latest = self._planner.latest
        return latest.chain if latest is not None else None

    @property
    def max_plate_nesting(self) -> Optional[int]:
        """The model's plate nesting (probed by running the model once, unless given)."""
        return self._planner.max_plate_nesting

    @property
    def temperature(self) -> int:
        """``1`` for EM, ``0`` for hard EM (see the class docs)."""
        return self._planner.temperature

    @property
    def jit(self) -> bool:
        """Whether steps run the model as planned, from captured programs (see the class docs)."""
        return self._planner.jit

    @property
    def compile(self) -> Union[bool, str]:
        """Whether (and how) captured programs are compiled by :func:`torch.compile`."""
        return self._planner.compile

    @_accepts_numpy
    def e_step(self, *args: Any, **kwargs: Any) -> EStep:
        """Run the E-step at the current parameters.

        :returns: an :class:`~pyro_em.estep.EStep` with ``log_z`` and each factor's posterior
            weights.
        """
        return self._e_step_at(self.temperature, args, kwargs)

    @_accepts_numpy
    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The loss at the current parameters, without updating them.

        :returns: the negative log marginal likelihood (plus negative log prior of MAP sites).
        """
        chain = self._planner.fused_chain_of(args, kwargs) if self.temperature == 1 else None
        if chain is not None:  # (one forward pass, no trace; a traced E-step names what fails)
            try:
                log_z = chain.log_marginal()
            except (ValueError, RuntimeError, IndexError):
                log_z = None
            if log_z is not None and bool(torch.isfinite(log_z)):
                return -float(log_z)
        return -float(self.e_step(*args, **kwargs).log_z)

    @_accepts_numpy
    def step(self, *args: Any, **kwargs: Any) -> float:
        """One EM iteration: an E-step, then an M-step that updates the param store.

        If anything fails, the param store is left as it was before the step.

        :returns: the loss at the parameters *before* the update (like :meth:`SVI.step`).
        :raises ValueError: on bad data or a model with nothing to fit.
        :raises RuntimeError: if the M-step produced non-finite parameter values.
        """
        return self._run([(args, kwargs)], keep=True)[0]

    @_guarded
    def step_batches(self, batches: Iterable) -> float:
        """One exact EM iteration over data given in batches: every batch's E-step at the
        same params, the sufficient statistics (and, for params without a closed form, ``Q``
        and its derivatives) added up over the batches, then one M-step. The iterates are
        those of :meth:`step` on the concatenated data, while memory holds one batch (a rule
        that needs a param solved earlier in the step, such as a scale its new mean, costs
        another pass over the batches; so does each evaluation of ``Q``).

        :param batches: a re-iterable of batches of model arguments: each a tuple (or list)
            of positional arguments, a dict of keyword arguments, or a single tensor. A
            :class:`torch.utils.data.DataLoader` works as it is.
        :returns: the loss at the params before the update, summed over the batches.
        :raises ValueError: as :meth:`step`; also if ``batches`` is empty or its batches use
            the params differently.

        Example::

            loader = DataLoader(TensorDataset(data), batch_size=10_000)
            for _ in range(100):
                loss = em.step_batches(loader)
        """
        return self._step_batches(batches)[0]

    def _start_run(self) -> None:
        """Called before each run of a fit with restarts (stepwise EM forgets its statistics)."""

    def _settings(self) -> iteration.Settings:
        return iteration.Settings(self.reg_covar, self._gradient_m_step, self.map_prefix, self.hmm_algorithm)

    def _run(self, batches: Iterable, keep: bool, cache: bool = True) -> Tuple[float, int]:
        self._e_steps += 1
        loss, rows, self.stalled = iteration.run(self._planner, self._settings(), batches, keep, self._online, cache)
        if self.stalled:
            warnings.warn(
                "The gradient M-step could not increase Q along param(s) "
                + ", ".join(f"'{n}'" for n in self.stalled)
                + " although its gradient there is not small (the model rejects every nearby "
                "value, or Q is not smooth there): they kept their values.",
                MStepWarning,
                stacklevel=3,
            )
        return loss, rows

    @_guarded
    def fit(
        self,
        *args: Any,
        max_iter: int = 100,
        tol: float = 1e-6,
        progress: bool = False,
        callback: Optional[Callable[[int, float], Optional[bool]]] = None,
        n_init: int = 1,
        init: Optional[Callable] = None,
        **kwargs: Any,
    ) -> EMResult:
        """Run :meth:`step` until the loss stops improving; with ``n_init > 1``, from several
        starts, keeping the best.

        Convergence is declared when the loss changes by at most ``tol`` relative to its
        magnitude, ``|loss[i-1] - loss[i]| <= tol * max(1, |loss[i-1]|)``, so ``tol`` does not
        depend on the data size.

        :param max_iter: the maximum number of EM iterations (>= 1).
        :param tol: relative tolerance on the change of the loss (>= 0).
        :param progress: show a tqdm progress bar with the loss.
        :param callback: called as ``callback(iteration, loss)`` after each step; returning
            ``True`` stops the loop.
        :param n_init: number of runs (restarts). Each run starts with the model's params
            (MAP values included) removed from the param store, so they are initialized anew
            by the model (and ``init_loc_fn``); the run with the lowest final loss is kept in
            the store. Reproducible under :func:`pyro.set_rng_seed`.
        :param init: ``init(*args, **kwargs)``, called at the start of each run (it may set
            params with ``pyro.param``; see :mod:`pyro_em.init`). Given alone, one run.
        :returns: an :class:`EMResult` (of the best run, with ``run_losses`` and ``best_run``
            when restarting).
        :raises ValueError: if ``max_iter``, ``tol`` or ``n_init`` is out of range.
        :warns ConvergenceWarning: if ``max_iter`` iterations ran without converging.
        :warns CollapseWarning: if a mixture weight went to 0 or a variance to the
            ``reg_covar`` floor.

        Example::

            result = em.fit(data, n_init=5, init=lambda data: pyro.param(
                "locs", pyro_em.init.kmeans_plusplus(data, 3)))
            print(result.run_losses, result.best_run)
        """
        max_iter, tol = check_fit_args(max_iter, tol)
        fit_kwargs = dict(max_iter=max_iter, tol=tol, progress=progress, callback=callback)
        if n_init != 1 or init is not None:
            result = restarts.fit_restarts(self, args, kwargs, n_init, init, fit_kwargs)
        else:
            result = self._fit_once(args, kwargs, **fit_kwargs)
        self._check_structure_kept(args, kwargs)
        restarts.warn_collapsed(self.plan.params if self.plan else [], self.reg_covar,
                                lambda: self.posterior(*args, **kwargs))
        return result

    def _fit_once(self, args: tuple, kwargs: dict, **fit_kwargs) -> EMResult:
        points = rows(args, kwargs)
        return self._fit_loop(lambda: (self.step(*args, **kwargs), points), **fit_kwargs)

    @_guarded
    def fit_batches(
        self,
        batches: Iterable,
        max_iter: int = 100,
        tol: float = 1e-6,
        progress: bool = False,
        callback: Optional[Callable[[int, float], Optional[bool]]] = None,
    ) -> EMResult:
        """Run :meth:`step_batches` until the loss stops improving, as :meth:`fit` runs
        :meth:`step` (same arguments, convergence test and warnings). Each iteration is logged
        on the ``pyro_em`` logger at level INFO (loss, seconds, data points per second), and
        shown by the progress bar.

        :param batches: a re-iterable of batches of model arguments (see :meth:`step_batches`).
        :returns: an :class:`EMResult`; ``losses`` are sums over the batches.

        Example::

            result = em.fit_batches(DataLoader(TensorDataset(data), batch_size=10_000),
                                    max_iter=200, progress=True)
        """
        max_iter, tol = check_fit_args(max_iter, tol)
        result = self._fit_loop(lambda: self._step_batches(batches), max_iter, tol, progress, callback)
        restarts.warn_collapsed(self.plan.params if self.plan else [], self.reg_covar)
        return result

    def _step_batches(self, batches: Iterable) -> Tuple[float, int]:
        return self._run(_Batches(batches), keep=False, cache=isinstance(batches, Sequence))

    def _fit_loop(self, step: Callable[[], Tuple[float, int]], max_iter: int, tol: float, progress: bool, callback) -> EMResult:
        monotone = self._gradient_m_step.optim is None and self._online is None  # (exact EM)
        if self.accelerate == "squarem":
            step = Squarem(step, lambda: self.plan.params, tol)
        start = self._e_steps
        result = fit_loop(step, max_iter, tol, progress, callback, type(self).__name__,
                          self._round_off if monotone else None, lambda: self.stalled)
        result.n_e_steps = self._e_steps - start
        return result

    def _round_off(self) -> float:
        """The relative change of the loss that round-off can make, in the params' precision."""
        store = pyro.get_param_store()
        dtype = store[self.plan.params[0]].dtype if self.plan and self.plan.params[0] in store else torch.float64
        return max(1e-9, 100 * torch.finfo(dtype).eps)

    def _check_structure_kept(self, args: tuple, kwargs: dict) -> None:
        """With Pyro's validation on and ``jit=True``: run the model once more after a fit and
        raise if its sites, shapes or plates differ from those it was planned with (steps that
        do not run the model, a fused chain's or a captured program's, would not have seen it)."""
        from pyro.infer.util import is_validation_enabled

        if self.jit and is_validation_enabled():
            self._planner.check_structure_kept(args, kwargs)

    @_accepts_numpy
    def posterior(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Posterior marginals of every enumerated latent site at the current parameters.

        :returns: ``{site name: probs}``; ``probs`` has the site's plate dims followed by one
            dim over the site's values (in ``enumerate_support()`` order), e.g. the
            ``(N, K)`` responsibilities of a mixture.
        """
        chain = self._planner.fused_chain_of(args, kwargs) if self.temperature == 1 else None
        if chain is not None and chain.active is None:  # (one forward-backward pass: no trace)
            return chain.marginals()
        return site_marginals(self.e_step(*args, **kwargs), self.max_plate_nesting)

    @_accepts_numpy
    def log_likelihood(self, *args: Any, **kwargs: Any) -> float:
        """The log marginal likelihood of the observations at the current params, every
        discrete latent summed out, without the MAP sites' log prior.

        :returns: ``log p(data | params)``, summed over the data (scaled as the model says).
        """
        return selection.log_likelihood(self._e_step_at(1, args, kwargs))

    @_accepts_numpy
    def bic(self, *args: Any, n: Optional[int] = None, **kwargs: Any) -> float:
        """Bayesian information criterion, ``-2 log_likelihood + p log n`` (lower is better),
        as scikit-learn's ``GaussianMixture.bic`` and hmmlearn's ``bic``.

        :param n: the number of observations; by default every unmasked batch element of the
            observed sites (a DiscreteHMM's steps each count), as those libraries count samples.
        :returns: the criterion; ``p`` counts the free parameters of every param and MAP site
            (see :mod:`pyro_em.selection`).
        """
        estep = self._e_step_at(1, args, kwargs)
        n = selection.count_observations(estep) if n is None else n
        return -2 * selection.log_likelihood(estep) + self._free_parameters(estep) * math.log(n)

    @_accepts_numpy
    def aic(self, *args: Any, **kwargs: Any) -> float:
        """Akaike information criterion, ``-2 log_likelihood + 2 p`` (lower is better).

        :returns: the criterion, with ``p`` as in :meth:`bic`.
        """
        estep = self._e_step_at(1, args, kwargs)
        return -2 * selection.log_likelihood(estep) + 2 * self._free_parameters(estep)

    @_accepts_numpy
    def decode(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """The joint MAP value of every discrete latent (a max-product contraction, as
        ``infer_discrete(temperature=0)``; Viterbi for a ``pyro.markov`` chain) and the Viterbi
        path of every ``DiscreteHMM`` site, at the current params.

        :returns: ``{site: value}``: each enumerated site's value with its plate shape (values
            as ``enumerate_support`` gives them; arbitrary where the site is masked out), and a
            DiscreteHMM site's ``(..., T)`` state path.

        Example::

            states = em.decode(data)["z"]      # (N,) most likely component of each datum
        """
        return selection.decode(self._e_step_at(0, args, kwargs), self.max_plate_nesting)

    @_accepts_numpy
    def covariance(self, *args: Any, **kwargs: Any) -> Covariance:
        """The asymptotic covariance of the fitted params, the inverse of the observed
        information (minus the Hessian of the log marginal likelihood, plus the log prior of
        MAP sites) at the current params, by autograd through the exact E-step (see
        :mod:`pyro_em.information`: free coordinates of each constraint, entries on a boundary
        held fixed). Meaningful at a maximum (fit to convergence first), with enough data for
        the likelihood to be near-quadratic there; in a mixture the labels are arbitrary, so
        read each component's errors with its own label. Costs one reverse pass of the E-step
        per free coordinate.

        :returns: a :class:`~pyro_em.information.Covariance` over every entry of every param.
        :raises ValueError: naming the params if the information is singular (an
            unidentified model) or not positive definite (not a maximum), or a param's
            constraint has no free parametrization.

        Example::

            em.fit(data)
            cov = em.covariance(data)
            cov.block("locs")  # (K, D, K, D)
        """
        store = pyro.get_param_store()
        with rollback_new_params():
            names = [n for n, site in self._e_step_at(1, args, kwargs).trace.nodes.items() if site["type"] == "param"]
            first_dim = self._planner.first_available_dim(args, kwargs)
            values = {name: store[name].detach() for name in names}
            return observed_covariance(self._planner.fitted_model, args, kwargs, first_dim, values,
                                       {name: store._constraints[name] for name in names})

    @_accepts_numpy
    def standard_errors(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Each fitted param's standard errors, of its shape: the square roots of the diagonal
        of :meth:`covariance` (0 for entries held fixed on a boundary).

        :raises ValueError: as :meth:`covariance`.

        Example::

            em.fit(data)
            se = em.standard_errors(data)
            print(pyro.param("locs"), "+-", 1.96 * se["locs"])
        """
        return self.covariance(*args, **kwargs).standard_errors()

    def _e_step_at(self, temperature: int, args: tuple, kwargs: dict) -> EStep:
        """The E-step at ``temperature`` (whatever :attr:`temperature` the fit uses); params it
        creates are removed again if it fails."""
        return self._planner.e_step(temperature, args, kwargs)

    def _free_parameters(self, estep: EStep) -> int:
        names = [n for n, site in estep.trace.nodes.items() if site["type"] == "param"]
        return selection.count_free_parameters(pyro.get_param_store(), names)


class _Batches:
    """A re-iterable of batches, each as ``(args, kwargs)``: a tuple or list is positional
    arguments, a dict keyword arguments, anything else (a tensor) the one argument; numpy
    arrays become tensors."""

    def __init__(self, batches: Iterable):
        if isinstance(batches, (torch.Tensor, np.ndarray)):
            raise TypeError(
                "batches must be an iterable of batches (a list of tensors, a DataLoader), not "
                "one tensor: use EM.step for the whole data, or split it, e.g. data.split(10_000)."
            )
        self.batches = batches

    def __iter__(self) -> Iterator[Tuple[tuple, dict]]:
        for batch in self.batches:
            if isinstance(batch, dict):
                yield (), {k: _tensor(v) for k, v in batch.items()}
            elif isinstance(batch, (tuple, list)):
                yield tuple(_tensor(a) for a in batch), {}
            else:
                yield (_tensor(batch),), {}


def _tensor(a: Any) -> Any:
    return torch.as_tensor(a) if isinstance(a, np.ndarray) else a
