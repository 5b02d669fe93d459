"""PyTorch3D rasterisation helpers shared by the data-preparation renderer and the STF renderer."""

from __future__ import annotations

import warnings
from collections.abc import Callable

BIN_OVERFLOW_WARNING = "Bin size was too small"


def rasterize_with_bin_fallback(rasterize: Callable[[int | None], object], bin_size: int | None):
    """``rasterize(bin_size)``, redone with the naive rasteriser (``bin_size=0``) when the coarse bins overflow.

    Bin overflow is a RuntimeError on CPU but only a warning, with silently missing faces, on CUDA; both cases fall
    back. Other warnings are passed on.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fragments = rasterize(bin_size)
            overflow = any(BIN_OVERFLOW_WARNING in str(w.message) for w in caught)
        except RuntimeError as error:
            if "faces per bin" not in str(error):
                raise
            overflow = True
    for w in caught:
        if BIN_OVERFLOW_WARNING not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rasterize(0) if overflow else fragments
