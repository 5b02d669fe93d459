"""Stage ``distill`` of the encoder (paper §3.1, reference §8.1–8.2): teach the SDF and STF-colour heads.

The paper's objective, added to the NeRF losses::

    L_distill = E_{x ~ U[-1,1]³} [ |SDF_θ(x) − SDF_teacher(x)| + |RGB_θ(x) − RGB_NN(x)| ]

where ``RGB_NN(x)`` is the colour of the point of the asset's RGB point cloud nearest to ``x`` and the teacher is
Point-E's SDF regressor (:class:`shapee.models.pointe_sdf.PointESDF`). These are free functions on plain tensors so
that :meth:`shapee.models.Transmitter.loss_dict` can wire them in one place::

    points, sdf_t = teacher_sdf(batch, teacher="mesh", n_points=4096)           # [B, P, 3], [B, P]
    nn_rgb = nearest_cloud_colour(batch["points"][..., :3], batch["points"][..., 3:6], points)  # [B, P, 3]
    out = transmitter.query(transmitter.decode_params(latent), points)         # sdf [B, P], stf_rgb [B, P, 3]
    losses.update(distill_loss(out, sdf_t, nn_rgb))                             # distill_sdf, distill_rgb

Decisions (documented here because the paper does not say):

* **The tanh.** The Transmitter's SDF head is ``tanh(raw)`` (§2.3), so its output lies in (−1, 1) while a teacher's
  world-unit SDF reaches about −1.7 at the corners of the box. We compare ``sdf_θ`` with ``tanh(SDF_teacher)``, not
  with the teacher clipped to [−1, 1]: with the tanh target the optimum ``raw = SDF_teacher`` is finite everywhere
  (a clipped target of ±1 can only be approached as ``raw → ±∞``, so far-field points would push the head's
  pre-activation without bound), and near the surface ``tanh(s) ≈ s``, so the 0 level and the slope that marching
  cubes interpolates are the teacher's. The head's pre-activation thus learns the teacher's SDF itself.
* **Which points, teacher ``mesh``** (the default: the asset's exact SDF, :mod:`shapee.data.sdf`): the record's SDF
  samples, **uniform-in-box and near-surface alike**. The records store the two kinds shuffled together with no
  label, so the uniform ones cannot be singled out; and we would keep the near-surface ones anyway: the STF stage
  meshes the 0 level on a 128³ grid (cell 0.016) which uniform samples almost never land that close to, while the
  exact mesh SDF, unlike a regressor, is as trustworthy there as anywhere. ``uniform_only=True`` restricts to the
  uniform ones when the batch carries a boolean ``sdf_is_uniform`` ``[B, S]`` mask (records do not yet).
* **Which points, teacher ``pointe``**: x ~ U[-1, 1]³, as the paper's expectation; the regressor is queried there
  (fresh points every step) on the asset's first ``n_ctx`` cloud points.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from shapee.models.pointe_sdf import PointESDF

TEACHERS = ("mesh", "pointe")
SDF_TARGETS = ("tanh", "clip")


def nearest_cloud_colour(
    cloud_xyz: Tensor, cloud_rgb: Tensor, points: Tensor, *, max_block_elements: int = 2**25
) -> Tensor:
    """Colour of the nearest cloud point (Euclidean) of each query: ``RGB_NN(x)`` of the distill loss.

    Args:
        cloud_xyz: ``[B, N, 3]`` cloud positions; cloud_rgb: ``[B, N, C]`` their colours (C = 3 for RGB).
        points: ``[B, P, 3]`` queries.
        max_block_elements: queries are processed in chunks whose distance block ``[B, chunk, N]`` holds at most
            this many floats (2²⁵: 128 MiB), whatever B and N are.

    Returns:
        ``[B, P, C]``: ``cloud_rgb[b, argmin_n |points[b, p] − cloud_xyz[b, n]|]``, brute force over all N points
        (no approximate index). Distances are fp32 via the ``|a|² − 2ab + |b|²`` matmul (fast on GPU); its rounding
        (~1e-6 on squared distances of [-1, 1]³ points) can only swap two neighbours that are equally near to that
        precision, which picks the same colour for any practical purpose. No gradient flows into the choice of
        neighbour; a gradient w.r.t. ``cloud_rgb`` flows through the gathered colours.
    """
    if cloud_xyz.ndim != 3 or cloud_xyz.shape[-1] != 3:
        raise ValueError(f"cloud_xyz must be [B, N, 3], got {tuple(cloud_xyz.shape)}")
    if cloud_rgb.ndim != 3 or cloud_rgb.shape[:2] != cloud_xyz.shape[:2]:
        raise ValueError(
            f"cloud_rgb must be [B, N, C] with B, N of cloud_xyz {tuple(cloud_xyz.shape[:2])}, got {tuple(cloud_rgb.shape)}"
        )
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != cloud_xyz.shape[0]:
        raise ValueError(f"points must be [B, P, 3] with B = {cloud_xyz.shape[0]}, got {tuple(points.shape)}")
    if cloud_xyz.shape[1] == 0:
        raise ValueError("cloud_xyz is empty: no nearest point exists")
    if max_block_elements < 1:
        raise ValueError(f"max_block_elements must be >= 1, got {max_block_elements}")
    B, N, _ = cloud_xyz.shape
    chunk = max(1, max_block_elements // max(1, B * N))
    with torch.no_grad():
        cloud = cloud_xyz.float()  # [B, N, 3]
        idx = [torch.cdist(q.float(), cloud).argmin(dim=-1) for q in points.split(chunk, dim=1)]  # [B, chunk] each
        idx = torch.cat(idx, dim=1) if idx else points.new_zeros(points.shape[:2], dtype=torch.long)  # [B, P]
    return cloud_rgb.gather(1, idx[..., None].expand(-1, -1, cloud_rgb.shape[-1]))  # [B, P, C]


def sdf_target(teacher_sdf: Tensor, mode: str = "tanh") -> Tensor:
    """What the tanh-bounded SDF head is compared with: ``tanh(teacher_sdf)`` (default) or the clip to [−1, 1]."""
    if mode == "tanh":
        return torch.tanh(teacher_sdf)
    if mode == "clip":
        return teacher_sdf.clamp(-1.0, 1.0)
    raise ValueError(f"sdf target mode must be one of {SDF_TARGETS}, got {mode!r}")


def distill_loss(
    transmitter_query_out: Mapping[str, Tensor], teacher_sdf: Tensor, nn_rgb: Tensor, *, sdf_target_mode: str = "tanh"
) -> dict[str, Tensor]:
    """The two distillation terms, each a mean L1 over the batch's query points.

    Args:
        transmitter_query_out: :meth:`Transmitter.query` at the teacher's points: ``sdf`` ``[B, P]`` (tanh-bounded,
            positive inside) and ``stf_rgb`` ``[B, P, 3]`` in [0, 1].
        teacher_sdf: ``[B, P]`` the teacher's SDF in world units, positive inside (treated as a constant).
        nn_rgb: ``[B, P, 3]`` the nearest cloud colours, in [0, 1] (a constant).
        sdf_target_mode: ``"tanh"`` (default, see the module docstring) or ``"clip"``.

    Returns:
        ``{"distill_sdf": mean |sdf − tanh(teacher_sdf)|, "distill_rgb": mean |stf_rgb − nn_rgb|}`` (0-d tensors).
    """
    sdf, rgb = transmitter_query_out["sdf"], transmitter_query_out["stf_rgb"]
    if sdf.shape != teacher_sdf.shape:
        raise ValueError(f"query sdf {tuple(sdf.shape)} and teacher_sdf {tuple(teacher_sdf.shape)} differ in shape")
    if rgb.shape != nn_rgb.shape:
        raise ValueError(f"query stf_rgb {tuple(rgb.shape)} and nn_rgb {tuple(nn_rgb.shape)} differ in shape")
    target = sdf_target(teacher_sdf.detach().float(), sdf_target_mode)  # [B, P]
    return {
        "distill_sdf": (sdf.float() - target).abs().mean(),
        "distill_rgb": (rgb.float() - nn_rgb.detach().float()).abs().mean(),
    }


def uniform_box_points(
    batch_size: int, n_points: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """``[B, n_points, 3]`` points uniform in the world box [-1, 1]³."""
    return torch.rand(batch_size, n_points, 3, device=device, generator=generator) * 2.0 - 1.0


def _random_subset(n_total: int, n: int, shape_b: int, device, generator, priority: Tensor | None = None) -> Tensor:
    """``[B, n]`` random distinct indices in [0, n_total); rows with ``priority`` True come first."""
    keys = torch.rand(shape_b, n_total, device=device, generator=generator)  # [B, S] in [0, 1)
    if priority is not None:
        keys = keys - priority.float()  # the wanted rows get keys in [-1, 0): they sort first
    return keys.argsort(dim=1)[:, :n]


def teacher_sdf(
    batch: Mapping[str, Tensor],
    teacher: str = "mesh",
    pointe_model: PointESDF | None = None,
    n_points: int | None = 4096,
    *,
    uniform_only: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher SDF samples for the distill loss: ``(points [B, P, 3], sdf [B, P])``, world frame, positive inside,
    world units (not tanh'd: :func:`distill_loss` does that).

    Args:
        batch: collated records (:class:`shapee.data.AssetDataset`): ``sdf_points`` ``[B, S, 3]`` and ``sdf``
            ``[B, S]`` for ``"mesh"``; ``points`` ``[B, N, 6]`` for ``"pointe"``.
        teacher: ``"mesh"``: a random subset of ``n_points`` of the record's exact samples per asset (all of them,
            shuffled, when ``n_points`` is None or larger). ``"pointe"``: ``n_points`` fresh x ~ U[-1, 1]³ per asset
            evaluated by ``pointe_model`` (eval mode, no gradient) on the first ``n_ctx`` cloud points.
        pointe_model: the trained teacher; required for ``"pointe"``.
        n_points: P, the samples per asset (required for ``"pointe"``).
        uniform_only: ``"mesh"`` only: keep only samples flagged by ``batch["sdf_is_uniform"]`` ``[B, S]``.
        generator: optional RNG for the subset / the uniform points.
    """
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    if n_points is not None and n_points < 1:
        raise ValueError(f"n_points must be >= 1 or None, got {n_points}")

    if teacher == "pointe":
        if pointe_model is None:
            raise ValueError("teacher='pointe' needs pointe_model (a trained shapee.models.pointe_sdf.PointESDF)")
        if n_points is None:
            raise ValueError("teacher='pointe' needs n_points (how many uniform points to query per asset)")
        cloud = pointe_model.cloud_from_batch(batch)  # [B, n_ctx, 3]
        points = uniform_box_points(cloud.shape[0], n_points, device=cloud.device, generator=generator)  # [B, P, 3]
        was_training = pointe_model.training
        pointe_model.eval()
        try:
            with torch.no_grad():
                sdf = pointe_model.world_sdf(points, cloud.float()).float()  # [B, P]
        finally:
            pointe_model.train(was_training)
        return points, sdf

    for key in ("sdf_points", "sdf"):
        if key not in batch:
            raise KeyError(f"teacher='mesh' needs batch[{key!r}]: build the AssetDataset with load_sdf=True")
    sdf_points, sdf = batch["sdf_points"], batch["sdf"]  # [B, S, 3], [B, S]
    if sdf_points.ndim != 3 or sdf_points.shape[-1] != 3 or sdf.shape != sdf_points.shape[:2]:
        raise ValueError(f"batch['sdf_points'] must be [B, S, 3] and batch['sdf'] [B, S], got "
                         f"{tuple(sdf_points.shape)} and {tuple(sdf.shape)}")
    B, S = sdf.shape
    n = S if n_points is None else min(n_points, S)
    mask = None
    if uniform_only:
        if "sdf_is_uniform" not in batch:
            raise KeyError("uniform_only=True needs batch['sdf_is_uniform'] [B, S] (which samples are uniform in the "
                           "box); the records do not mark them, so use uniform_only=False")
        mask = batch["sdf_is_uniform"].bool()  # [B, S]
        available = int(mask.sum(dim=1).min())
        if available < n:
            raise ValueError(f"uniform_only: an asset has only {available} uniform samples, n_points={n} asked")
    idx = _random_subset(S, n, B, sdf.device, generator, priority=mask)  # [B, n]
    points = sdf_points.gather(1, idx[..., None].expand(-1, -1, 3))  # [B, n, 3]
    return points, sdf.gather(1, idx)
