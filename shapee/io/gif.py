"""Turntable GIFs (Pillow), written atomically.

A GIF frame holds at most 256 colours, so every frame is quantised to its own adaptive palette (median cut, no
dithering: renders of smooth shading on black look cleaner without dither noise than with it). Pillow merges
consecutive identical frames into one longer frame; a turntable has none unless the object is empty or symmetric.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["to_uint8_frames", "write_gif"]


def to_uint8_frames(frames) -> np.ndarray:
    """Frames ``[N, H, W, 3]`` (uint8, or floats in [0, 1]; numpy or torch) → a uint8 numpy array ``[N, H, W, 3]``.

    Raises:
        ValueError: wrong shape, no frames, non-finite floats.
        TypeError: a dtype that is neither uint8 nor floating point.
    """
    if hasattr(frames, "detach"):  # torch tensor, on any device
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [N, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {tuple(frames.shape)}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        if not np.isfinite(frames).all():
            raise ValueError("frames contain NaN or inf")
        return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    raise TypeError(f"frames must be uint8 or floats in [0, 1], got dtype {frames.dtype}")


def write_gif(frames, path: str | os.PathLike, *, fps: float = 10.0, loop: int = 0) -> Path:
    """Write ``frames`` ``[N, H, W, 3]`` (uint8 sRGB, or floats in [0, 1]) as an animated GIF at ``path``.

    Args:
        fps: frames per second (GIF stores delays in 1/100 s, so the delay is rounded to 10 ms).
        loop: 0 loops forever, k > 0 plays k + 1 times.

    Atomic: written beside ``path`` under a temporary name and renamed over it; parent folders are created.
    Returns ``path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"{path}: a GIF path must end in .gif")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not isinstance(loop, int) or loop < 0:
        raise ValueError(f"loop must be an integer >= 0, got {loop!r}")
    frames = to_uint8_frames(frames)  # [N, H, W, 3]
    images = [
        Image.fromarray(frame, mode="RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                     dither=Image.Dither.NONE)
        for frame in frames  # a loop over frames (tens), not pixels
    ]
    buffer = io.BytesIO()
    duration_ms = max(10, int(round(1000.0 / fps / 10.0)) * 10)
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=loop,
                   disposal=1, optimize=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
