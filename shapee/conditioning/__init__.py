"""Frozen open_clip text and image-grid embedders."""

from shapee.conditioning.clip import TINY_CLIP_CFG, CLIPUnavailableError, FrozenCLIP

__all__ = ["FrozenCLIP", "CLIPUnavailableError", "TINY_CLIP_CFG"]
