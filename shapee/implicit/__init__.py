"""shapee.implicit: the latent → per-asset MLP weights projection and the NeRSTF implicit MLP (reference §1.6, §2)."""

from shapee.implicit.mlp import MetaLinear, NeRSTFMLP
from shapee.implicit.params_proj import ChannelsParamsProj, ChannelsProj

__all__ = ["ChannelsParamsProj", "ChannelsProj", "MetaLinear", "NeRSTFMLP"]
