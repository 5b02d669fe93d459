"""Evaluation: encoder reconstruction (the paper's Table 1: NeRF/STF PSNR, Chamfer, F-score) and text-to-3D
generation (CLIP R-Precision, time per sample). Entry point: ``scripts/evaluate.py task=encoder|generation``."""

from shapee.eval.encoder import evaluate_encoder
from shapee.eval.generation import evaluate_generation
from shapee.eval.metrics import (
    DEFAULT_FSCORE_THRESHOLD,
    chamfer_distance,
    f_score,
    nearest_distances,
    point_set_metrics,
    psnr,
    psnr_per_item,
    r_precision,
    retrieval_ranks,
    sample_mesh_points,
)
from shapee.eval.toy_match import ToyReferences, toy_match_rate

__all__ = [
    "DEFAULT_FSCORE_THRESHOLD",
    "ToyReferences",
    "chamfer_distance",
    "evaluate_encoder",
    "evaluate_generation",
    "f_score",
    "nearest_distances",
    "point_set_metrics",
    "psnr",
    "psnr_per_item",
    "r_precision",
    "retrieval_ranks",
    "toy_match_rate",
    "sample_mesh_points",
]
