"""pyro_em: Expectation-Maximization for Pyro models with discrete latent variables."""

from .em import EM, ConvergenceWarning, EMResult
from .estep import EStep, e_step
from .map_sites import MapMessenger

__all__ = ["EM", "EMResult", "ConvergenceWarning", "EStep", "e_step", "MapMessenger"]
__version__ = "0.1.0"
