"""shapee.encoder: point-conv queries, cross-attention over the point cloud and the multiview pixels, processor and
latent bottleneck (reference §1.3–§1.5)."""

from shapee.encoder.bottleneck import ClampDiffusionNoise, inv_parabola_alpha_bar
from shapee.encoder.encoder import ChannelsEncoder
from shapee.encoder.multiview import MultiviewPointCloudEmbedding, pixel_points
from shapee.encoder.pointconv import PointSetEmbedding, ball_query

__all__ = [
    "ChannelsEncoder",
    "ClampDiffusionNoise",
    "MultiviewPointCloudEmbedding",
    "PointSetEmbedding",
    "ball_query",
    "inv_parabola_alpha_bar",
    "pixel_points",
]
