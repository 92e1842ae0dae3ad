"""Typed architecture configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an IWAE/VAE with one or more Gaussian stochastic layers.

    ``latent_dims[i]`` is the size of stochastic layer h_{i+1} (bottom first) and ``hidden_dims[i]`` the
    tanh hidden sizes of the deterministic blocks on both sides of it: q(h_{i+1} | h_i) and
    p(h_i | h_{i+1}), with h_0 = x. The paper's nets are ``paper(1)`` and ``paper(2)``.
    """

    x_dim: int = 784
    latent_dims: tuple[int, ...] = (50,)
    hidden_dims: tuple[tuple[int, ...], ...] = field(default_factory=lambda: ((200, 200),))

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_dims", tuple(int(d) for d in self.latent_dims))
        object.__setattr__(self, "hidden_dims", tuple(tuple(int(h) for h in hs) for hs in self.hidden_dims))
        if self.x_dim < 1:
            raise ValueError(f"x_dim must be >= 1, got {self.x_dim}")
        if not self.latent_dims:
            raise ValueError("at least one stochastic layer is needed")
        if len(self.hidden_dims) != len(self.latent_dims):
            raise ValueError(
                f"hidden_dims has {len(self.hidden_dims)} entries but there are "
                f"{len(self.latent_dims)} stochastic layers"
            )
        if any(d < 1 for d in self.latent_dims) or any(h < 1 for hs in self.hidden_dims for h in hs):
            raise ValueError("layer sizes must be positive")

    @classmethod
    def paper(cls, layers: int = 1, x_dim: int = 784) -> ModelConfig:
        """The architectures of Burda et al. (2016), section 5."""
        if layers == 1:
            return cls(x_dim=x_dim, latent_dims=(50,), hidden_dims=((200, 200),))
        if layers == 2:
            return cls(x_dim=x_dim, latent_dims=(100, 50), hidden_dims=((200, 200), (100, 100)))
        raise ValueError(f"the paper has 1 or 2 stochastic layers, got {layers}")

    @property
    def n_layers(self) -> int:
        return len(self.latent_dims)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_dims"] = list(self.latent_dims)
        d["hidden_dims"] = [list(h) for h in self.hidden_dims]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = set(d) - {"x_dim", "latent_dims", "hidden_dims"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(
            x_dim=int(d["x_dim"]),
            latent_dims=tuple(d["latent_dims"]),
            hidden_dims=tuple(tuple(h) for h in d["hidden_dims"]),
        )
