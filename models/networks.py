"""The networks of the paper: tanh MLPs feeding diagonal Gaussian and Bernoulli layers.

Shapes: x is [batch, x_dim]; k-sample latents are [k, batch, d]. The recognition model q factorises as
q(h_1 | x) q(h_2 | h_1) ..., the generative model as p(h_L) p(h_{L-1} | h_L) ... p(x | h_1), p(h_L) = N(0, I).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.distributions import LOG_2PI, bernoulli_log_prob, gaussian_log_prob, std_normal_log_prob
from models.fused import Kernel, bernoulli_output_log_prob, linear_tanh

# Clipping used by the paper's code before taking the logit of the training pixel mean.
MEAN_CLIP = 1e-3


def _linear(x: torch.Tensor, layer: nn.Linear, detach: bool) -> torch.Tensor:
    if detach:
        return F.linear(x, layer.weight.detach(), layer.bias.detach())
    return layer(x)


class MLP(nn.Module):
    """tanh(W_n ... tanh(W_1 x + b_1) ... + b_n)."""

    def __init__(self, d_in: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        sizes = (d_in, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.d_out = sizes[-1]
        # Set by the trainer (training/step.py): in training mode each layer runs as one fused linear + tanh
        # node (models/fused.py, ``LinearTanh``); evaluation keeps torch.tanh.
        self.fused_tanh = False

    def forward(self, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        fused = self.fused_tanh and self.training
        for layer in self.layers:
            if fused:
                w, b = (layer.weight.detach(), layer.bias.detach()) if detach else (layer.weight, layer.bias)
                x = linear_tanh(x, w, b)
            else:
                x = torch.tanh(_linear(x, layer, detach))
        return x


class GaussianLayer(nn.Module):
    """A diagonal Gaussian whose mean is linear and whose standard deviation is exp(linear) of an MLP."""

    def __init__(self, d_in: int, hidden: tuple[int, ...], d_out: int) -> None:
        super().__init__()
        self.hidden = MLP(d_in, hidden)
        self.mean = nn.Linear(self.hidden.d_out, d_out)
        self.log_std = nn.Linear(self.hidden.d_out, d_out)

    def forward(self, x: torch.Tensor, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.hidden(x, detach)
        return _linear(a, self.mean, detach), _linear(a, self.log_std, detach)


class BernoulliLayer(nn.Module):
    """Independent Bernoulli pixels with logits linear in an MLP's output."""

    def __init__(self, d_in: int, hidden: tuple[int, ...], d_out: int) -> None:
        super().__init__()
        self.hidden = MLP(d_in, hidden)
        self.logits = nn.Linear(self.hidden.d_out, d_out)

        # Set by the trainer (training/step.py): log_prob then runs the fused output layer (models/fused.py).
        self.fused_kernel: Kernel | None = None

    def forward(self, h: torch.Tensor, detach: bool = False) -> torch.Tensor:
        return _linear(self.hidden(h, detach), self.logits, detach)

    def log_prob(self, x: torch.Tensor, h: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """log p(x | h) summed over pixels: x [B, D], h [..., B, d] -> [..., B]."""
        if self.fused_kernel is None or detach:
            return bernoulli_log_prob(x, self(h, detach))
        return bernoulli_output_log_prob(x, self.hidden(h), self.logits.weight, self.logits.bias, self.fused_kernel)


@dataclass
class Latents:
    """Reparameterised samples h_l = mean_l + exp(log_std_l) · eps_l of every stochastic layer, bottom first."""

    h: list[torch.Tensor]
    log_stds: list[torch.Tensor]
    eps: list[torch.Tensor]

    def log_q(self) -> torch.Tensor:
        """log q(h | x) of these samples: [k, batch]. Uses eps directly: (h - mean)/std == eps."""
        total = 0.0
        for eps, log_std in zip(self.eps, self.log_stds, strict=True):
            total = total - 0.5 * (eps * eps).sum(-1) - log_std.sum(-1) - 0.5 * eps.shape[-1] * LOG_2PI
        return total  # type: ignore[return-value]


class IWAE(nn.Module):
    """Generative model p(x, h) and recognition model q(h | x) sharing one architecture config.

    ``q[l]`` is q(h_{l+1} | h_l) (h_0 = x); ``p[0]`` is p(x | h_1) and ``p[l]`` (l >= 1) is p(h_l | h_{l+1}).
    VAE and IWAE differ only in the training objective, so one class serves both.
    """

    def __init__(self, config: ModelConfig, data_mean: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        dims = (config.x_dim, *config.latent_dims)
        self.q = nn.ModuleList(
            GaussianLayer(dims[i], config.hidden_dims[i], dims[i + 1]) for i in range(config.n_layers)
        )
        p: list[nn.Module] = [BernoulliLayer(dims[1], tuple(reversed(config.hidden_dims[0])), dims[0])]
        p += [
            GaussianLayer(dims[i + 1], tuple(reversed(config.hidden_dims[i])), dims[i])
            for i in range(1, config.n_layers)
        ]
        self.p = nn.ModuleList(p)
        self.reset_parameters(data_mean)

    def reset_parameters(self, data_mean: torch.Tensor | None = None) -> None:
        """Glorot-uniform weights, zero biases; the output bias is the logit of the clipped pixel mean."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if data_mean is not None:
            mean = data_mean.reshape(-1).to(torch.float64).clamp(MEAN_CLIP, 1.0 - MEAN_CLIP)
            if mean.numel() != self.config.x_dim:
                raise ValueError(f"data_mean has {mean.numel()} entries, expected {self.config.x_dim}")
            with torch.no_grad():
                self.p[0].logits.bias.copy_(torch.logit(mean).to(self.p[0].logits.bias.dtype))

    # --- recognition model -------------------------------------------------------------------------
    def sample_latents(
        self,
        x: torch.Tensor,
        k: int,
        noise: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Latents:
        """Draw k reparameterised samples per image from q(h | x). x: [B, D]; noise: [k, B, d_l] per layer."""
        if noise is None:
            noise = self.draw_noise(k, x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        hs, log_stds = [], []
        below: torch.Tensor = x
        for layer, eps in zip(self.q, noise, strict=True):
            mean, log_std = layer(below)
            h = mean + torch.exp(log_std) * eps
            hs.append(h)
            log_stds.append(log_std)
            below = h
        return Latents(hs, log_stds, list(noise))

    def draw_noise(
        self,
        k: int,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Standard normal noise for every stochastic layer: [k, batch, d_l]."""
        return [
            torch.randn(k, batch, d, generator=generator, device=device, dtype=dtype) for d in self.config.latent_dims
        ]

    def log_q(self, x: torch.Tensor, h: list[torch.Tensor], detach_params: bool = False) -> torch.Tensor:
        """log q(h | x): [k, B]. With ``detach_params`` only the path through h carries gradient."""
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        below = x
        for layer, hl in zip(self.q, h, strict=True):
            mean, log_std = layer(below, detach_params)
            total = total + gaussian_log_prob(hl, mean, log_std)
            below = hl
        return total

    # --- generative model --------------------------------------------------------------------------
    def log_p(self, x: torch.Tensor, h: list[torch.Tensor], detach_params: bool = False) -> torch.Tensor:
        """log p(x, h) = log p(h_L) + Σ log p(h_l | h_{l+1}) + log p(x | h_1): [k, B]."""
        total = std_normal_log_prob(h[-1])
        for layer_idx in range(1, self.config.n_layers):
            mean, log_std = self.p[layer_idx](h[layer_idx], detach_params)
            total = total + gaussian_log_prob(h[layer_idx - 1], mean, log_std)
        return total + self.p[0].log_prob(x, h[0], detach_params)

    def log_weights(
        self,
        x: torch.Tensor,
        k: int,
        noise: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """log w_i = log p(x, h_i) - log q(h_i | x) for k samples h_i ~ q(h | x): x [B, D] -> [k, B]."""
        lat = self.sample_latents(x, k, noise=noise, generator=generator)
        return self.log_p(x, lat.h) - lat.log_q()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixel probabilities of n ancestral samples from p(x, h): [n, D]."""
        param = self.p[0].logits.weight
        h = torch.randn(n, self.config.latent_dims[-1], generator=generator, dtype=param.dtype, device=param.device)
        for layer_idx in range(self.config.n_layers - 1, 0, -1):
            mean, log_std = self.p[layer_idx](h)
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            h = mean + torch.exp(log_std) * eps
        return torch.sigmoid(self.p[0](h))

    @torch.no_grad()
    def posterior_means(
        self, x: torch.Tensor, samples: int = 100, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """E_q[h_l | x] for every layer: [B, d_l]. The bottom mean is exact; upper layers average the
        conditional mean E[h_{l+1} | h_l] over ``samples`` draws of h_l (the paper's estimator)."""
        mean, log_std = self.q[0](x)
        out = [mean]
        if self.config.n_layers > 1:
            eps = torch.randn((samples, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device)
            h = mean + torch.exp(log_std) * eps
            for layer in self.q[1:]:
                m, s = layer(h)
                out.append(m.mean(0))
                e = torch.randn(m.shape, generator=generator, dtype=m.dtype, device=m.device)
                h = m + torch.exp(s) * e
        return out

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decoder_macs_per_sample(self) -> int:
        """Multiply-adds of the generative network per latent sample (the L_k engine's matmul work)."""
        total = 0
        for layer in self.p:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    total += m.in_features * m.out_features
        return total
