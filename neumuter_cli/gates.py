"""The Hard-Concrete gate of Louizos et al. (2018), one per FFN neuron (paper eqs. 10-12)."""
from __future__ import annotations

import math

import torch

GAMMA, ZETA = -0.1, 1.1
EPS = 1e-6


def initial_log_alpha() -> float:
    """The log_alpha at which the deterministic gate is exactly 1 (every gate open)."""
    p = (1 - GAMMA) / (ZETA - GAMMA)
    return math.log(p / (1 - p))


def stretch(s: torch.Tensor) -> torch.Tensor:
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def sample_gate(log_alpha: torch.Tensor, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A stochastic gate value (training): s = sigmoid((logit(u) + log_alpha) / beta), stretched."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / beta)
    return stretch(s)


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The eval value of a gate: sigmoid(log_alpha), stretched and clamped to [0, 1]."""
    return stretch(torch.sigmoid(log_alpha))


def open_probability(log_alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """P(gate != 0) per neuron; eq. 12's R(M) is 1 minus its mean."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def l0_term(log_alphas: list[torch.Tensor], beta: float) -> torch.Tensor:
    """R(M) = 1 - mean over all neurons of P(gate != 0) (eq. 12)."""
    total = sum(a.numel() for a in log_alphas)
    return 1 - sum(open_probability(a, beta).sum() for a in log_alphas) / total
