"""Evaluation metrics: image PSNR, point-set Chamfer distance and F-score, CLIP R-Precision.

Units and conventions (stated once, used by every report):

* **PSNR** on sRGB images in [0, 1] (``max_value = 1``), in dB: ``10·log10(max² / MSE)``. Identical images have an
  infinite PSNR; ``cap=`` clamps it (and any larger value) to a finite number for tables and means.
* **Chamfer distance** between point sets in the normalised world frame (objects inside [-1, 1]³, box side 2): the
  symmetric mean *unsquared* nearest-neighbour distance ``½ (mean_a min_b ‖a − b‖ + mean_b min_a ‖a − b‖)``
  (the "Chamfer-L1" of Occupancy Networks, Mescheder et al. 2019), in world units; ``squared=True`` gives the squared
  variant ``mean_a min_b ‖a − b‖² + mean_b min_a ‖a − b‖²`` (PyTorch3D's / Point-E's convention).
* **F-score** at threshold τ (Tatarchenko et al. 2019): precision = fraction of predicted points within τ of the
  reference set, recall = fraction of reference points within τ of the prediction, F = 2PR / (P + R). Default
  τ = 0.02 world units = 1 % of the box side.
* **CLIP R-Precision** (Park et al. 2021; Dream Fields, Jain et al. 2022; used by Point-E and Shap-E): each rendered
  image retrieves among all prompts of the evaluation set by CLIP cosine similarity; precision = the fraction of
  images whose own prompt ranks first. Ties count as misses (a degenerate embedding cannot score 100 %).

Nearest neighbours are vectorised: ``torch.cdist`` over row chunks of the first set, so memory stays at ``chunk × M``
distances whatever the sizes (see :func:`nearest_distances` for the precision).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shapee.eval.config import EncoderEval

DEFAULT_FSCORE_THRESHOLD = EncoderEval.fscore_threshold  # world units: 1 % of the [-1, 1]³ box side


# -------------------------------------------------------------------------------------------------------- PSNR
def _check_pair(prediction: Tensor, target: Tensor) -> None:
    if not (torch.is_tensor(prediction) and torch.is_tensor(target)):
        raise TypeError(f"psnr: prediction and target must be tensors, got {type(prediction)} and {type(target)}")
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if prediction.numel() == 0:
        raise ValueError("psnr: empty images")


def _mse_to_psnr(mse: Tensor, max_value: float, cap: float | None) -> Tensor:
    with torch.no_grad():
        value = 10.0 * torch.log10(max_value**2 / mse)  # mse == 0 → +inf
    return value if cap is None else value.clamp(max=cap)


def psnr(prediction: Tensor, target: Tensor, max_value: float = 1.0, cap: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB over all elements: ``10·log10(max_value² / MSE)``, computed in float64.

    ``inf`` for identical images unless ``cap`` (dB) is given, which clamps the result to at most ``cap``.
    """
    _check_pair(prediction, target)
    mse = torch.mean((prediction.detach().double() - target.detach().double()) ** 2)
    return float(_mse_to_psnr(mse, max_value, cap))


def psnr_per_item(
    prediction: Tensor, target: Tensor, *, batch_dims: int = 1, max_value: float = 1.0, cap: float | None = None
) -> Tensor:
    """PSNR of each item of a batch: ``[*batch, ...]`` → ``[*batch]`` (float64), MSE over the remaining dims.

    E.g. renders ``[B, N, H, W, 3]`` with ``batch_dims=1`` give one PSNR per asset over all its views' pixels.
    """
    _check_pair(prediction, target)
    if not 0 <= batch_dims < prediction.ndim:
        raise ValueError(f"psnr_per_item: batch_dims={batch_dims} must be in [0, {prediction.ndim})")
    diff = (prediction.detach().double() - target.detach().double()) ** 2  # [*batch, ...]
    mse = diff.flatten(batch_dims).mean(-1)  # [*batch]
    return _mse_to_psnr(mse, max_value, cap)


# ----------------------------------------------------------------------------------------- point-set distances
def _check_points(name: str, points: Tensor) -> Tensor:
    if not torch.is_tensor(points):
        raise TypeError(f"{name} must be a tensor of points [N, 3], got {type(points).__name__}")
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise ValueError(f"{name} is empty: Chamfer distance / F-score need at least one point on each side")
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return points


def nearest_distances(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """For each point of ``a`` ``[N, 3]``, the Euclidean distance to its nearest point of ``b`` ``[M, 3]``: ``[N]``.

    ``chunk`` rows of ``a`` at a time (memory ``chunk × M``), in float32 or better. The nearest point is found with
    the fast matrix-product form of ``cdist`` and its distance then recomputed exactly from the coordinates, so a
    point that has an exact copy in ``b`` gets distance 0 (the product form alone leaves ~1e-4 there). In float32 the
    product form can pick a neighbour whose squared distance exceeds the minimum by ~1e-7 (a mistake that only
    matters for near-duplicates); float64 inputs are exact.
    """
    a, b = _check_points("a", a), _check_points("b", b)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    out = []
    for part in a.split(chunk):  # [c, 3]
        nearest = torch.cdist(part, b).argmin(dim=-1)  # [c]
        out.append((part - b[nearest]).norm(dim=-1))  # [c] exact distance to the chosen neighbour
    return torch.cat(out)  # [N]


def chamfer_distance(a: Tensor, b: Tensor, *, squared: bool = False, chunk: int = 4096) -> float:
    """Symmetric Chamfer distance between point sets ``a`` ``[N, 3]`` and ``b`` ``[M, 3]`` (world units).

    Default: ``½ (mean_a d(a, b) + mean_b d(b, a))`` with unsquared nearest distances, so a set and its copy
    shifted by a vector shorter than half the set's point spacing are exactly the shift's length apart.
    ``squared=True``: ``mean_a d² + mean_b d²`` (sum, not average, as PyTorch3D).
    """
    d_ab, d_ba = nearest_distances(a, b, chunk), nearest_distances(b, a, chunk)  # [N], [M]
    if squared:
        return float(d_ab.square().mean() + d_ba.square().mean())
    return float(0.5 * (d_ab.mean() + d_ba.mean()))


def f_score(
    prediction: Tensor, reference: Tensor, threshold: float = DEFAULT_FSCORE_THRESHOLD, *, chunk: int = 4096
) -> dict[str, float]:
    """F-score at ``threshold`` (world units) of ``prediction`` ``[N, 3]`` against ``reference`` ``[M, 3]``.

    Returns ``{"precision", "recall", "f_score"}`` in [0, 1]; a point exactly at ``threshold`` counts as a match.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"f_score threshold must be a finite number > 0 (world units), got {threshold!r}")
    precision = float((nearest_distances(prediction, reference, chunk) <= threshold).double().mean())
    recall = float((nearest_distances(reference, prediction, chunk) <= threshold).double().mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f_score": f}


def point_set_metrics(
    prediction: Tensor, reference: Tensor, threshold: float = DEFAULT_FSCORE_THRESHOLD, *, chunk: int = 4096
) -> dict[str, float]:
    """:func:`chamfer_distance` (Chamfer-L1) and :func:`f_score` from one nearest-neighbour pass each way:
    ``{"chamfer", "precision", "recall", "f_score"}`` (half the work of calling both)."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"f_score threshold must be a finite number > 0 (world units), got {threshold!r}")
    d_pr, d_rp = nearest_distances(prediction, reference, chunk), nearest_distances(reference, prediction, chunk)
    precision = float((d_pr <= threshold).double().mean())
    recall = float((d_rp <= threshold).double().mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer": float(0.5 * (d_pr.mean() + d_rp.mean())), "precision": precision, "recall": recall, "f_score": f}


def sample_mesh_points(verts: Tensor, faces: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` area-uniform random points ``[n, 3]`` on the triangle mesh ``verts`` ``[V, 3]``, ``faces`` ``[F, 3]``.

    Deterministic for a seeded ``generator`` (on the CPU; the points are moved to ``verts``' device).
    """
    if verts.ndim != 2 or verts.shape[-1] != 3 or faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(
            f"mesh must be verts [V, 3] and faces [F, 3], got {tuple(verts.shape)} and {tuple(faces.shape)}"
        )
    if faces.shape[0] == 0:
        raise ValueError("cannot sample points on a mesh without faces")
    if n < 1:
        raise ValueError(f"number of points must be >= 1, got {n}")
    tri = verts.detach().double()[faces.long()].cpu()  # [F, 3, 3]
    area = 0.5 * torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)  # [F]
    if not float(area.sum()) > 0:
        raise ValueError("cannot sample points on a mesh of zero area")
    face = torch.multinomial(area, n, replacement=True, generator=generator)  # [n]
    r1 = torch.rand(n, generator=generator, dtype=torch.float64)
    r2 = torch.rand(n, generator=generator, dtype=torch.float64)
    s = r1.sqrt()
    bary = torch.stack([1 - s, s * (1 - r2), s * r2], dim=-1)  # [n, 3], uniform on the triangle
    points = torch.einsum("nk,nkc->nc", bary, tri[face])  # [n, 3]
    return points.to(device=verts.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- CLIP retrieval
def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, true_index: Tensor) -> Tensor:
    """Rank (0 = first) of each image's true text among all texts by cosine similarity: ``[Q]`` int64.

    ``image_emb`` ``[Q, D]``, ``text_emb`` ``[P, D]`` (normalised here), ``true_index`` ``[Q]`` in [0, P). Ties with
    the true text count against it: rank = number of other texts scoring at least as high.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb [Q, D] and text_emb [P, D] must share D, got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    true_index = torch.as_tensor(true_index, device=image_emb.device).long()
    if true_index.shape != (image_emb.shape[0],):
        raise ValueError(f"true_index must be [Q] = [{image_emb.shape[0]}], got {tuple(true_index.shape)}")
    P = text_emb.shape[0]
    if P < 2:
        raise ValueError(f"R-Precision needs at least 2 texts to retrieve among, got {P}")
    if true_index.numel() and (true_index.min() < 0 or true_index.max() >= P):
        raise ValueError(
            f"true_index must lie in [0, {P}), got values in [{int(true_index.min())}, {int(true_index.max())}]"
        )
    img = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    txt = torch.nn.functional.normalize(text_emb.float().to(img.device), dim=-1)
    scores = img @ txt.T  # [Q, P] cosine similarities
    true_score = scores.gather(1, true_index[:, None])  # [Q, 1]
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, true_index[:, None], False)  # [Q, P]
    return ((scores >= true_score) & others).sum(dim=-1)  # [Q]


def r_precision(image_emb: Tensor, text_emb: Tensor, true_index: Tensor) -> float:
    """CLIP R-Precision (R = 1): the fraction of images ``[Q, D]`` whose true text (``true_index`` ``[Q]``) ranks
    first among ``text_emb`` ``[P, D]`` by cosine similarity; ties count as misses. In [0, 1]."""
    ranks = retrieval_ranks(image_emb, text_emb, true_index)
    if ranks.numel() == 0:
        raise ValueError("r_precision: no images")
    return float((ranks == 0).double().mean())
