"""The math of importance weighted autoencoders: networks, distributions, bounds, estimators.

Pure tensors in, tensors out: no file, network or web code lives here.
"""

from models.config import ModelConfig
from models.networks import IWAE

__all__ = ["IWAE", "ModelConfig"]
