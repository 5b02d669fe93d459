"""Exponential moving average of the weights, parameterised as a half-life in training samples.

Karras et al. 2022 (EDM, ``training/training_loop.py``): after an optimiser step that consumed ``batch_samples``
samples, ``θ_ema ← β·θ_ema + (1−β)·θ`` with

    β = 0.5 ^ (batch_samples / max(h, 1e-8)),   h = min(halflife_samples, rampup_ratio · samples_seen)

so the EMA's weight on a past sample halves every ``halflife_samples`` samples, independently of the batch size, and
the ramp-up shortens the half-life early in training (β = 0 at the very first step: the EMA *is* the model), so that
the average is not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(
    *, batch_samples: int, samples_seen: int, halflife_samples: float, rampup_ratio: float | None
) -> float:
    """Decay β for one EMA update (see the module docstring).

    Args:
        batch_samples: samples consumed by this optimiser step (the global batch).
        samples_seen: samples consumed *before* this step.
        halflife_samples: EMA half-life in samples.
        rampup_ratio: ramp-up ratio, or ``None`` for no ramp-up.
    """
    halflife = float(halflife_samples)
    if rampup_ratio is not None:
        halflife = min(halflife, rampup_ratio * samples_seen)
    return 0.5 ** (batch_samples / max(halflife, 1e-8))


class EMA(nn.Module):
    """A frozen, eval-mode copy of a model whose weights follow :func:`ema_beta` averages.

    Buffers (e.g. normalisation statistics) are copied, not averaged. The copy is taken from ``model`` at
    construction ("synced at start"); under DDP build it from the already-broadcast module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "EMA":
        # The EMA is only ever used for evaluation/sampling: keep it (dropout etc.) in eval mode whatever is asked.
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        """``θ_ema ← β·θ_ema + (1−β)·θ`` for parameters; buffers copied."""
        for p_ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
