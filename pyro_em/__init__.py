"""pyro_em: Expectation-Maximization for Pyro models with discrete latent variables."""

from .closed_form import MStepPlan
from .em import EM
from .information import BoundaryWarning, Covariance
from .loop import ConvergenceWarning, EMResult, MStepWarning
from .estep import EStep, e_step
from .map_sites import MapMessenger
from .online import OnlineEM
from .restarts import CollapseWarning, SymmetryWarning
from .rules import Rule, UseContext, register_m_step
from . import init  # noqa: F401 (pyro_em.init, the starting-point helpers)

__all__ = [
    "EM",
    "EMResult",
    "Covariance",
    "BoundaryWarning",
    "OnlineEM",
    "ConvergenceWarning",
    "CollapseWarning",
    "SymmetryWarning",
    "MStepWarning",
    "EStep",
    "e_step",
    "MapMessenger",
    "MStepPlan",
    "Rule",
    "UseContext",
    "register_m_step",
]
__version__ = "0.1.0"
