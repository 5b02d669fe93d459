"""Latent rows → per-asset MLP weight rows (reference §1.6, the official ``ChannelsParamsProj``).

The latent ``[B, 1024, 1024]`` is read as 1024 tokens; token ``r`` becomes exactly one row of one meta weight matrix
of the implicit MLP (rows 0–255 → ``mlp.0.weight``, 256–511 → ``mlp.1.weight``, …, in the order of
``param_shapes``). For a parameter with ``rows × channels`` entries:

    h[b, v, :] = LayerNorm_channels( P_v · latent[b, offset + v, :] ) + bias[v, :]

where ``P_v`` is slice ``v`` of one ``Linear(d_latent, rows · channels)`` weight viewed as ``[rows, channels,
d_latent]`` (a separate ``d_latent → channels`` matrix per row), the LayerNorm's γ/β (γ initialised to
``learned_scale`` = 0.0625) are shared by all rows, and the per-row bias is the Linear's bias viewed as
``[rows, channels]``. Row ``v`` of the result is output neuron ``v``'s incoming weight vector (weights are
``[out, in]``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ChannelsProj(nn.Module):
    """One parameter's projection: ``[B, rows, d_latent] → [B, rows, channels]`` (keys ``proj.*``, ``norm.*``)."""

    def __init__(self, *, rows: int, channels: int, d_latent: int, init_scale: float = 1.0, learned_scale: float = 0.0625) -> None:
        super().__init__()
        self.rows, self.channels, self.d_latent = rows, channels, d_latent
        self.proj = nn.Linear(d_latent, rows * channels)
        self.norm = nn.LayerNorm(channels)
        nn.init.normal_(self.proj.weight, std=init_scale / math.sqrt(d_latent))
        nn.init.zeros_(self.proj.bias)
        # The small γ keeps the initial per-asset weights small: LayerNorm output has unit scale per row.
        nn.init.constant_(self.norm.weight, learned_scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, rows, d_latent]`` → ``[B, rows, channels]``."""
        w = self.proj.weight.view(self.rows, self.channels, self.d_latent)  # [R, C, D]
        h = torch.einsum("brd,rcd->brc", x, w)  # [B, R, C]: row r through its own D→C matrix
        h = self.norm(h)  # [B, R, C]
        return h + self.proj.bias.view(self.rows, self.channels)  # [B, R, C]


class ChannelsParamsProj(nn.Module):
    """All meta parameters: latent ``[B, Σ rows, d_latent]`` → ``{name: [B, rows, channels]}``.

    ``param_shapes``: ordered ``{name: (rows, channels)}``, e.g. :meth:`NeRSTFMLP.meta_parameter_shapes`
    (``{"mlp.0.weight": (256, 93), "mlp.1.weight": (256, 256), …}``). Output keys are these names.
    ``key_prefix`` only shapes the submodule names: the official checkpoint names the MLP ``nerstf`` inside its
    renderer, so the projection of ``mlp.0.weight`` lives at ``projections.nerstf__mlp__0__weight`` ("." → "__").
    """

    def __init__(
        self,
        *,
        param_shapes: dict[str, tuple[int, int]],
        d_latent: int = 1024,
        init_scale: float = 1.0,
        learned_scale: float = 0.0625,
        key_prefix: str = "nerstf.",
    ) -> None:
        super().__init__()
        if not param_shapes:
            raise ValueError("param_shapes must name at least one parameter")
        self.param_shapes = {name: (int(r), int(c)) for name, (r, c) in param_shapes.items()}
        self.d_latent = d_latent
        self._module_keys = {name: (key_prefix + name).replace(".", "__") for name in self.param_shapes}
        self.projections = nn.ModuleDict(
            {
                self._module_keys[name]: ChannelsProj(
                    rows=rows, channels=channels, d_latent=d_latent, init_scale=init_scale, learned_scale=learned_scale
                )
                for name, (rows, channels) in self.param_shapes.items()
            }
        )

    @property
    def latent_ctx(self) -> int:
        """Number of latent rows consumed (1024 for the release)."""
        return sum(rows for rows, _ in self.param_shapes.values())

    def forward(self, latent: Tensor) -> dict[str, Tensor]:
        """``latent``: ``[B, latent_ctx, d_latent]`` (or flat ``[B, latent_ctx · d_latent]``) → ``{name: [B, rows, channels]}``."""
        if latent.ndim == 2:
            latent = latent.view(latent.shape[0], self.latent_ctx, -1)  # [B, R, D]
        if latent.ndim != 3 or latent.shape[1:] != (self.latent_ctx, self.d_latent):
            raise ValueError(
                f"latent must have shape [B, {self.latent_ctx}, {self.d_latent}] (or flat), got {tuple(latent.shape)}"
            )
        params = {}
        start = 0
        for name, (rows, _) in self.param_shapes.items():
            params[name] = self.projections[self._module_keys[name]](latent[:, start : start + rows])  # [B, R, C]
            start += rows
        return params
