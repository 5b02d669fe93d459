"""shapee.nn: building blocks shared by the encoder and the diffusion Transformer.

Pre-LN attention blocks with the official fused per-head layouts, the NeRF positional encoding and the sinusoidal
timestep embedding.
"""

from shapee.nn.attention import (
    MLP,
    MultiheadAttention,
    MultiheadCrossAttention,
    ResidualAttentionBlock,
    ResidualCrossAttentionBlock,
    SimplePerceiver,
    Transformer,
    init_linear,
)
from shapee.nn.encoding import (
    DIRECTION_OCTAVES,
    POSITION_OCTAVES,
    PosEmbLinear,
    nerf_encoding,
    nerf_encoding_width,
)
from shapee.nn.timestep import timestep_embedding

__all__ = [
    "MLP",
    "MultiheadAttention",
    "MultiheadCrossAttention",
    "ResidualAttentionBlock",
    "ResidualCrossAttentionBlock",
    "SimplePerceiver",
    "Transformer",
    "init_linear",
    "DIRECTION_OCTAVES",
    "POSITION_OCTAVES",
    "PosEmbLinear",
    "nerf_encoding",
    "nerf_encoding_width",
    "timestep_embedding",
]
