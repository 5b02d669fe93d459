"""shapee.data: meshes, renders, point clouds, SDF samples, asset records and the dataset.

Exports are resolved lazily (PEP 562) so that ``import shapee.data`` stays cheap: torch, trimesh and the
renderers load only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_asset": "shapee.data.prepare",
    "prepare_dataset": "shapee.data.prepare",
    "PrepareSettings": "shapee.data.prepare",
    "PrepareError": "shapee.data.prepare",
    "AssetDataset": "shapee.data.dataset",
    "collate_assets": "shapee.data.dataset",
    "AssetRecord": "shapee.data.records",
    "load_mesh": "shapee.data.mesh",
    "Mesh": "shapee.data.mesh",
    "MeshError": "shapee.data.mesh",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shapee.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
