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


def training_gate(log_alpha: torch.Tensor, beta: float, generator: torch.Generator | None = None,
                  straight_through: bool = True) -> torch.Tensor:
    """A stochastic gate value (training): s = sigmoid((logit(u) + log_alpha) / beta), stretched
    and clamped to [0, 1]. The noise u is drawn on the CPU (``generator`` is a CPU generator,
    so a seed gives the same gates on every device) and moved to ``log_alpha``'s device.

    With ``straight_through``, the gradient flows through the upper clamp: at initialisation
    the gate sits exactly at it (sigmoid(2.40)·1.2 − 0.1 = 1), so most noise samples would
    give no gradient at all."""
    u = torch.rand(log_alpha.shape, generator=generator).to(log_alpha.device).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / beta)
    stretched = s * (ZETA - GAMMA) + GAMMA
    gate = stretched.clamp(0.0, 1.0)
    if straight_through:
        upper = stretched.clamp(max=1.0)
        gate = gate + (stretched - upper) - (stretched - upper).detach()
    return gate


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
