"""The NeRSTF implicit MLP with per-asset weights (reference §2, official ``MLPNeRSTFModel``).

Layers (release sizes)::

    posenc(p) 93 ─ mlp.0 ─ mlp.1 ─ mlp.2 ─ mlp.3 ─ ⊕ posenc(d) 51 ─ mlp.4 ─ mlp.5 ─ mlp.6 → 12 channels
                  └──── weights from the latent (meta) ────┘           └──── shared weights ────┘

Every layer but the last is followed by swish. The meta layers' weights come per asset from the params projection
(:mod:`shapee.implicit.params_proj`); their biases are ordinary shared parameters. The meta weights also exist as
*buffers* (``mlp.{0..3}.weight``) only so that the official state dict loads; they are used only when no per-asset
params are given. The direction encoding is all zeros when no direction is given (always for STF queries and at the
released inference); the layer that takes it then skips those weight columns.

Output heads of the 12 channels (§2.3): 0 SDF (tanh, positive inside), 1/2 coarse/fine density (ReLU), 3–5 STF
colour, 6–8 coarse NeRF colour, 9–11 fine NeRF colour (sigmoid, in [0, 1]; the official ×255 is not used here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shapee.nn.encoding import DIRECTION_OCTAVES, POSITION_OCTAVES, nerf_encoding, nerf_encoding_width

N_OUTPUTS = 12


class MetaLinear(nn.Module):
    """A linear layer whose weight is supplied per asset: shared ``bias`` parameter, placeholder ``weight`` buffer."""

    def __init__(self, in_features: int, out_features: int, *, init_scale: float) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("weight", torch.randn(out_features, in_features) * (init_scale / math.sqrt(in_features)))

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x``: ``[B, P, in]``, ``weight``: ``[B, out, in]`` (one matrix per asset) → ``[B, P, out]``."""
        return torch.baddbmm(self.bias.to(x.dtype)[None, None, :], x, weight.transpose(1, 2))  # [B, P, out]


class NeRSTFMLP(nn.Module):
    """``mlp(params, points [B, P, 3], directions=None) -> dict`` of SDF, densities and colours.

    Module ``mlp`` is a ``ModuleList`` whose indices match the official keys (``mlp.{i}.weight/bias``).
    Init (§2.2): every weight N(0, (init_scale / sqrt(n_in))²), biases 0, then output bias[0] = ``initial_sdf_bias``
    (−0.1, "outside") and bias[1] = ``initial_density_bias`` (+0.1).
    """

    def __init__(
        self,
        *,
        d_hidden: int = 256,
        n_hidden_layers: int = 6,
        n_meta_layers: int = 4,
        insert_direction_at: int = 4,
        position_octaves: int = POSITION_OCTAVES,
        direction_octaves: int = DIRECTION_OCTAVES,
        init_scale: float = 0.25,
        initial_sdf_bias: float = -0.1,
        initial_density_bias: float = 0.1,
    ) -> None:
        super().__init__()
        if not 1 <= n_meta_layers <= insert_direction_at < n_hidden_layers:
            raise ValueError(
                "need 1 <= n_meta_layers <= insert_direction_at < n_hidden_layers, got "
                f"n_meta_layers={n_meta_layers}, insert_direction_at={insert_direction_at}, n_hidden_layers={n_hidden_layers}"
            )
        self.position_octaves = position_octaves
        self.direction_octaves = direction_octaves
        self.n_meta_layers = n_meta_layers
        self.insert_direction_at = insert_direction_at
        self.d_direction = nerf_encoding_width(3, direction_octaves)  # 51
        d_in = [nerf_encoding_width(3, position_octaves)] + [d_hidden] * n_hidden_layers  # [93, 256, …]
        d_in[insert_direction_at] += self.d_direction  # 307 at layer 4
        d_out = [d_hidden] * n_hidden_layers + [N_OUTPUTS]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(d_in, d_out)):
            if i < n_meta_layers:
                layers.append(MetaLinear(n_in, n_out, init_scale=init_scale))
            else:
                layer = nn.Linear(n_in, n_out)
                nn.init.normal_(layer.weight, std=init_scale / math.sqrt(n_in))
                nn.init.zeros_(layer.bias)
                layers.append(layer)
        self.mlp = nn.ModuleList(layers)
        with torch.no_grad():
            self.mlp[-1].bias[0] = initial_sdf_bias
            self.mlp[-1].bias[1] = initial_density_bias

    def meta_parameter_shapes(self) -> dict[str, tuple[int, int]]:
        """``{"mlp.0.weight": (256, 93), "mlp.1.weight": (256, 256), …}``: what the params projection must produce."""
        return {f"mlp.{i}.weight": (self.mlp[i].out_features, self.mlp[i].in_features) for i in range(self.n_meta_layers)}

    def forward(self, params: dict[str, Tensor] | None, points: Tensor, directions: Tensor | None = None) -> dict[str, Tensor]:
        """Query the field of ``B`` assets at ``P`` points each.

        ``params``: ``{"mlp.{i}.weight": [B, out, in]}`` from the params projection (``None``: use the placeholder
        buffers for every asset); ``points``: ``[B, P, 3]`` world frame; ``directions``: ``[B, P, 3]`` unit view
        directions or ``None``. Returns ``sdf``, ``density_coarse``, ``density_fine`` ``[B, P]`` and ``stf_rgb``,
        ``nerf_rgb_coarse``, ``nerf_rgb_fine`` ``[B, P, 3]``.
        """
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape [B, P, 3], got {tuple(points.shape)}")
        if directions is not None and directions.shape != points.shape:
            raise ValueError(f"directions must have the shape of points {tuple(points.shape)}, got {tuple(directions.shape)}")
        batch = points.shape[0]
        weights = []
        for i in range(self.n_meta_layers):
            layer = self.mlp[i]
            w = layer.weight.expand(batch, -1, -1) if params is None else params.get(f"mlp.{i}.weight")
            if w is None or w.shape != (batch, layer.out_features, layer.in_features):
                got = None if w is None else tuple(w.shape)
                raise ValueError(f"params['mlp.{i}.weight'] must have shape [{batch}, {layer.out_features}, {layer.in_features}], got {got}")
            weights.append(w)

        h = nerf_encoding(points, self.position_octaves)  # [B, P, 93]
        for i, layer in enumerate(self.mlp):
            if i == self.insert_direction_at and directions is None:
                # The direction encoding would be all zeros: its 51 weight columns add nothing, so multiply by the
                # first columns only (equal up to float summation order; 4% of the MLP's multiply-adds). This layer
                # is always a shared nn.Linear (n_meta_layers <= insert_direction_at).
                h = F.linear(h, layer.weight[:, : h.shape[-1]], layer.bias)  # [B, P, out]
            else:
                if i == self.insert_direction_at:
                    d = nerf_encoding(directions.to(h.dtype), self.direction_octaves)  # [B, P, 51]
                    h = torch.cat([h, d], dim=-1)  # [B, P, 256 + 51]
                h = layer(h, weights[i]) if i < self.n_meta_layers else layer(h)  # [B, P, out]
            if i < len(self.mlp) - 1:
                # In place when no graph is recorded (mesh and render queries): no fresh [B, P, 256] buffer per layer
                # (on the 2-core CPU the swish goes from 0.8 to 0.5 ns per element).
                h = F.silu(h, inplace=not torch.is_grad_enabled())  # swish
        return {
            "sdf": torch.tanh(h[..., 0]),  # [B, P] positive inside
            "density_coarse": F.relu(h[..., 1]),  # [B, P]
            "density_fine": F.relu(h[..., 2]),  # [B, P]
            "stf_rgb": torch.sigmoid(h[..., 3:6]),  # [B, P, 3]
            "nerf_rgb_coarse": torch.sigmoid(h[..., 6:9]),  # [B, P, 3]
            "nerf_rgb_fine": torch.sigmoid(h[..., 9:12]),  # [B, P, 3]
        }
