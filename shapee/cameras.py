"""Cameras and rays: the one camera convention of the whole package.

A camera is an origin and an orthonormal frame in world coordinates (reference §6.1):

* ``x``: image right, ``y``: image down, ``z``: viewing direction (so ``x × y = z``, right-handed);
* pixel (column ``u``, row ``v``) of a ``W × H`` image looks along
  ``z + x · (2u/(W−1) − 1) · tan(x_fov/2) + y · (2v/(H−1) − 1) · tan(y_fov/2)`` (normalised): rays are
  **corner-aligned**, pixel 0 and pixel W−1 sit exactly on ±tan(fov/2), as in the official code;
* depth is **planar** (along ``z``); distance along a ray = depth / (dir · z).

World frame: objects inside [-1, 1]³, +Z up, cameras of the training renders at distance 4 (the official ×2 units).
PyTorch3D uses pixel centres and other axes; :func:`to_pytorch3d` / :func:`from_pytorch3d` are the only place
that converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from pytorch3d.renderer import FoVPerspectiveCameras
from torch import Tensor

# Blender's default 50 mm lens on a 36 mm sensor: the field of view of the official training renders (§6.2).
BLENDER_FOV = 2.0 * math.atan(18.0 / 50.0)  # ≈ 0.6911 rad
# Field of view of the official notebooks' pan cameras.
PAN_FOV = 0.7
# Distance of the training cameras from the origin, in our (official ×2) units.
CAMERA_DISTANCE = 4.0


@dataclass
class Cameras:
    """A batch of ``N`` pinhole cameras sharing image size and field of view.

    ``origin``, ``x``, ``y``, ``z``: ``[N, 3]`` float tensors on one device. ``x_fov``/``y_fov`` in radians.
    """

    origin: Tensor  # [N, 3]
    x: Tensor  # [N, 3] image right
    y: Tensor  # [N, 3] image down
    z: Tensor  # [N, 3] viewing direction
    width: int
    height: int
    x_fov: float
    y_fov: float

    def __post_init__(self) -> None:
        for name in ("origin", "x", "y", "z"):
            value = getattr(self, name)
            if value.ndim != 2 or value.shape[-1] != 3:
                raise ValueError(f"Cameras.{name} must have shape [N, 3], got {tuple(value.shape)}")
        if not (self.origin.shape == self.x.shape == self.y.shape == self.z.shape):
            raise ValueError("Cameras.origin/x/y/z must all have the same shape [N, 3]")
        if self.width < 2 or self.height < 2:
            raise ValueError(f"camera images must be at least 2×2 pixels, got {self.width}×{self.height}")
        if not (0.0 < self.x_fov < math.pi and 0.0 < self.y_fov < math.pi):
            raise ValueError(f"field of view must be in (0, π) radians, got x_fov={self.x_fov}, y_fov={self.y_fov}")

    # ----------------------------------------------------------------------------------------------- container
    def __len__(self) -> int:
        return self.origin.shape[0]

    def __getitem__(self, index) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return replace(self, origin=self.origin[index], x=self.x[index], y=self.y[index], z=self.z[index])

    @property
    def device(self) -> torch.device:
        return self.origin.device

    def to(self, device=None, dtype=None) -> "Cameras":
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return replace(self, origin=move(self.origin), x=move(self.x), y=move(self.y), z=move(self.z))

    def resized(self, width: int, height: int | None = None) -> "Cameras":
        """The same cameras rendering at another resolution (same field of view)."""
        return replace(self, width=width, height=width if height is None else height)

    def scaled(self, factor: float) -> "Cameras":
        """Scale the world (camera origins) by ``factor``, e.g. 2 to go from Blender units to ours."""
        return replace(self, origin=self.origin * factor)

    @staticmethod
    def cat(cameras: "list[Cameras]") -> "Cameras":
        first = cameras[0]
        for c in cameras[1:]:
            if (c.width, c.height, c.x_fov, c.y_fov) != (first.width, first.height, first.x_fov, first.y_fov):
                raise ValueError("Cameras.cat needs cameras with the same image size and field of view")
        return replace(
            first,
            origin=torch.cat([c.origin for c in cameras]),
            x=torch.cat([c.x for c in cameras]),
            y=torch.cat([c.y for c in cameras]),
            z=torch.cat([c.z for c in cameras]),
        )

    # ------------------------------------------------------------------------------------------- (de)serialise
    def to_matrix(self) -> Tensor:
        """``[N, 4, 3]``: rows origin, x, y, z (what records store)."""
        return torch.stack([self.origin, self.x, self.y, self.z], dim=1)

    @classmethod
    def from_matrix(cls, matrix: Tensor, width: int, height: int, x_fov: float, y_fov: float | None = None) -> "Cameras":
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 3 or matrix.shape[1:] != (4, 3):
            raise ValueError(f"camera matrix must have shape [N, 4, 3], got {tuple(matrix.shape)}")
        return cls(
            origin=matrix[:, 0],
            x=matrix[:, 1],
            y=matrix[:, 2],
            z=matrix[:, 3],
            width=int(width),
            height=int(height),
            x_fov=float(x_fov),
            y_fov=float(x_fov if y_fov is None else y_fov),
        )

    # ------------------------------------------------------------------------------------------------- rays
    def _pixel_coefficients(self, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Corner-aligned image-plane coordinates of pixels, scaled by tan(fov/2).

        The released code's arithmetic in the cameras' dtype (float32): (index / (size − 1)) · 2 − 1, times
        tan(fov / 2). The tangent is taken in double precision from the Python-float fov and rounded once to the
        cameras' dtype, which is what the official encoder's rays carry: at the Blender fov 2·atan(18/50) that is
        float32(0.36), one ulp above ``torch.tan`` of the float32 fov. Both details matter because the encoder's
        NeRF encoding multiplies hit points by up to 2¹⁴: a differently ordered formula or that one ulp moves the
        view tokens by ~2e-4 of the official ones, instead of 2e-6 (``tests/test_official_parity.py``)."""
        dtype = self.origin.dtype
        tan_x = torch.tensor(math.tan(self.x_fov / 2), dtype=dtype, device=self.device)
        tan_y = torch.tensor(math.tan(self.y_fov / 2), dtype=dtype, device=self.device)
        fx = ((cols.to(dtype) / (self.width - 1)) * 2 - 1) * tan_x
        fy = ((rows.to(dtype) / (self.height - 1)) * 2 - 1) * tan_y
        return fx, fy

    def pixel_directions(self) -> Tensor:
        """Unit ray directions of every pixel: ``[N, H, W, 3]``."""
        rows = torch.arange(self.height, device=self.device)
        cols = torch.arange(self.width, device=self.device)
        fx, fy = self._pixel_coefficients(rows[:, None], cols[None, :])  # [H, 1], [1, W]
        d = (
            self.z[:, None, None, :]
            + self.x[:, None, None, :] * fx[None, :, :, None]
            + self.y[:, None, None, :] * fy[None, :, :, None]
        )  # [N, H, W, 3]
        return d / d.norm(dim=-1, keepdim=True)

    def rays(self) -> tuple[Tensor, Tensor]:
        """``(origins, directions)``, each ``[N, H, W, 3]``; directions are unit length."""
        directions = self.pixel_directions()
        origins = self.origin[:, None, None, :].expand_as(directions)
        return origins, directions

    def pixel_rays(self, view: Tensor, row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
        """Rays of chosen pixels: ``view``, ``row``, ``col`` are ``[R]`` integer tensors → ``[R, 3]`` each."""
        fx, fy = self._pixel_coefficients(row, col)
        d = self.z[view] + self.x[view] * fx[:, None] + self.y[view] * fy[:, None]
        return self.origin[view], d / d.norm(dim=-1, keepdim=True)

    def depth_to_points(self, depth: Tensor) -> Tensor:
        """Back-project planar depth ``[N, H, W]`` to world points ``[N, H, W, 3]`` (inf depth gives inf/nan)."""
        directions = self.pixel_directions()
        cos = (directions * self.z[:, None, None, :]).sum(-1)  # [N, H, W]
        distance = depth / cos
        return self.origin[:, None, None, :] + directions * distance[..., None]


# ------------------------------------------------------------------------------------------------ camera sets
def look_at(origin: Tensor, target: Tensor | None = None, up: tuple[float, float, float] = (0.0, 0.0, 1.0)) -> tuple[Tensor, Tensor, Tensor]:
    """Frames of cameras at ``origin`` ``[N, 3]`` looking at ``target`` (default the world origin) with +Z up.

    z = toward the target, y = −(up projected ⟂ z), x = y × z (reference §6.1). Cameras looking straight up or
    down use +Y as their up vector instead.
    """
    if target is None:
        target = torch.zeros_like(origin)
    z = target - origin
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    up_t = torch.tensor(up, dtype=origin.dtype, device=origin.device).expand_as(z)
    alt_up = torch.tensor((0.0, 1.0, 0.0), dtype=origin.dtype, device=origin.device).expand_as(z)
    parallel = (z * up_t).sum(-1, keepdim=True).abs() > 1 - 1e-6
    up_t = torch.where(parallel, alt_up, up_t)
    y = -(up_t - (up_t * z).sum(-1, keepdim=True) * z)
    y = y / y.norm(dim=-1, keepdim=True)
    x = torch.cross(y, z, dim=-1)
    return x, y, z


def random_cameras(
    n: int,
    *,
    distance: float = CAMERA_DISTANCE,
    fov: float = BLENDER_FOV,
    resolution: int = 256,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Cameras:
    """``n`` cameras at uniformly random directions on a sphere of radius ``distance``, looking at the origin."""
    d = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    origin = (d * distance).to(torch.float32)
    x, y, z = look_at(origin)
    return Cameras(origin, x, y, z, resolution, resolution, fov, fov).to(device)


def orbit_cameras(
    n: int = 20,
    *,
    distance: float = CAMERA_DISTANCE,
    elevation: float = math.atan2(0.5, 1.0),
    fov: float = PAN_FOV,
    resolution: int = 64,
    start_angle: float = 0.0,
    endpoint: bool = False,
    device: torch.device | str | None = None,
) -> Cameras:
    """A turntable ("pan") of ``n`` cameras around +Z at ``elevation`` radians above the horizon.

    With the default elevation atan(0.5) these are the official notebooks' pan cameras
    (z ∝ (sin θ, cos θ, −0.5), origin = −distance·z). ``endpoint=False`` avoids repeating the first frame.
    """
    theta = torch.linspace(start_angle, start_angle + 2 * math.pi, n + (0 if endpoint else 1), dtype=torch.float64)
    theta = theta if endpoint else theta[:-1]
    z = torch.stack(
        [torch.sin(theta) * math.cos(elevation), torch.cos(theta) * math.cos(elevation),
         torch.full_like(theta, -math.sin(elevation))],
        dim=-1,
    )
    origin = (-distance * z).to(torch.float32)
    x, y, z = look_at(origin)
    return Cameras(origin, x, y, z, resolution, resolution, fov, fov).to(device)


# --------------------------------------------------------------------------------------------- PyTorch3D bridge
def _p3d_fov(fov: float, size: int) -> float:
    # Ours: pixel 0 / size−1 sit on ±tan(fov/2) (corner-aligned). PyTorch3D: pixel centres sit at ±(1 − 1/size) of
    # the NDC range. Matching every pixel exactly needs tan(fov_p3d/2) = tan(fov/2) · size/(size − 1).
    return 2.0 * math.atan(math.tan(fov / 2) * size / (size - 1))


def to_pytorch3d(cameras: Cameras, znear: float = 0.1, zfar: float = 100.0):
    """``FoVPerspectiveCameras`` that render exactly our pixels (square images, equal fovs only).

    PyTorch3D's view frame is +X left, +Y up, +Z forward, with row-vector transforms ``X_view = X_world @ R + T``;
    so R's columns are (−x, −y, z) and ``T = −origin @ R``.
    """
    if cameras.width != cameras.height or abs(cameras.x_fov - cameras.y_fov) > 1e-9:
        raise ValueError(
            f"PyTorch3D rendering needs square images with x_fov == y_fov, got {cameras.width}×{cameras.height}, "
            f"fov {cameras.x_fov}/{cameras.y_fov}"
        )
    R = torch.stack([-cameras.x, -cameras.y, cameras.z], dim=-1)  # [N, 3, 3], columns
    T = -torch.einsum("ni,nij->nj", cameras.origin, R)  # [N, 3]
    fov = _p3d_fov(cameras.x_fov, cameras.width)
    return FoVPerspectiveCameras(
        R=R, T=T, fov=fov, degrees=False, znear=znear, zfar=zfar, device=cameras.device
    )


def from_pytorch3d(p3d_cameras, width: int, height: int | None = None) -> Cameras:
    """Inverse of :func:`to_pytorch3d` for ``FoVPerspectiveCameras`` with a scalar field of view in radians."""
    height = width if height is None else height
    if width != height:
        raise ValueError("from_pytorch3d supports square images only")
    R = p3d_cameras.R  # [N, 3, 3]
    T = p3d_cameras.T  # [N, 3]
    x, y, z = -R[..., 0], -R[..., 1], R[..., 2]
    origin = -torch.einsum("nj,nij->ni", T, R)  # R orthonormal: origin = −T Rᵀ
    fov_p3d = p3d_cameras.fov.flatten()[0].item()
    if getattr(p3d_cameras, "degrees", True):
        fov_p3d = math.radians(fov_p3d)
    fov = 2.0 * math.atan(math.tan(fov_p3d / 2) * (width - 1) / width)
    return Cameras(origin, x, y, z, width, height, fov, fov)
