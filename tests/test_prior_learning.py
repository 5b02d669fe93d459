"""Learning, not just running: a tiny text prior on a 2 shapes × 2 colours toy world draws what it is asked for
(issue 5).

The whole chain, each step through the library function of its script with the script's own Hydra config, as a user
runs them (README "Results"):

1. ``scripts/prepare_data.py data=toy n=8 data.shapes=[sphere,cube] data.colors=[red,blue] data.random_rotation=false``
   → 8 records, two of every (shape, colour), in proportions that differ (cubes 0.75–1.33 tall per side);
2. ``scripts/train_encoder.py experiment=tiny_distill`` from scratch: stage distill trains the SDF and STF-colour
   heads on the records' exact SDF samples and point-cloud colours (with the NeRF terms), so meshes come out directly;
3. ``scripts/extract_latents.py`` → one latent ``[128, 64]`` per record, with its three captions;
4. ``scripts/train_diffusion.py experiment=tiny_prior model.denoiser.width=64 model.denoiser.heads=4``: the tiny
   denoiser (at twice its width) conditioned by the tiny random-weight CLIP on one of each asset's three captions,
   drawn at random every step;
5. :class:`shapee.pipeline.TextTo3D`: ``N_SAMPLES`` samples of each first caption ("a red sphere", ...), classifier-free
   guidance, Karras sampler, SDF meshes with STF vertex colours;
6. :func:`shapee.eval.toy_match.toy_match_rate`: a sample matches when its mesh is nearer (Chamfer) to its prompt's
   shape than to the other and its mean vertex colour nearer (sRGB) to its prompt's colour than to the other.

Set ``SHAPEE_PRIOR_LEARN_SEED`` to repeat with other seeds (initial weights, training noise, samples; the toy world
stays the same). Measured (2 shared CPU cores, one torch thread): 100 % of 32 samples with seeds 0, 1, 2 and 3,
265–280 process CPU-s per run (encoder 165–175, prior 90–97). Some starts do worse: a CI run whose initial weights
were not seeded (before ``trainer.seed`` set them) got 75 %, "a blue cube" coloured red.
"""

import os
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shapee.data.prepare import prepare_dataset
from shapee.data.toy import toy_assets
from shapee.eval.toy_match import ToyReferences, format_toy_match, toy_match_rate
from shapee.pipeline import TextTo3D
from shapee.train.diffusion import train_diffusion
from shapee.train.encoder import train_encoder
from shapee.train.extract import extract_latents

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SHAPEE_PRIOR_LEARN_SEED", "0"))
SHAPES, COLORS = ["sphere", "cube"], ["red", "blue"]
N_ASSETS = 8  # two of every (shape, colour)
ENCODER_STEPS = int(os.environ.get("SHAPEE_PRIOR_LEARN_ENCODER_STEPS", "300"))
PRIOR_STEPS = int(os.environ.get("SHAPEE_PRIOR_LEARN_PRIOR_STEPS", "3000"))
N_SAMPLES = 8  # per prompt
GUIDANCE = float(os.environ.get("SHAPEE_PRIOR_LEARN_GUIDANCE", "6.0"))
SAMPLER_STEPS = 16
GRID = 32  # marching-cubes grid of the sampled meshes
PROMPTS = ["a red sphere", "a blue sphere", "a red cube", "a blue cube"]  # each asset's first caption

TOY_WORLD = [
    "data=toy", f"n={N_ASSETS}", f"data.shapes=[{','.join(SHAPES)}]", f"data.colors=[{','.join(COLORS)}]",
    "data.random_rotation=false", "resolution=64", "views=4", "targets=4", "pc_resolution=64", "pc_views=8",
    "n_points=1024", "sdf_uniform=4096", "sdf_near=4096", "progress=false",
]
# Every asset in every batch; one checkpoint and no evaluation renders (the samples below are the evaluation).
ENCODER = [
    "experiment=tiny_distill", f"trainer.max_steps={ENCODER_STEPS}", f"trainer.ckpt_every={ENCODER_STEPS}",
    "trainer.eval_every=0", f"trainer.log_every={max(1, ENCODER_STEPS // 10)}", f"trainer.batch_size={N_ASSETS}",
    "trainer.optimizer.lr=3e-3", "trainer.lr_schedule.warmup_steps=20", "trainer.ema.halflife_ksamples=0.4",
    f"trainer.seed={SEED}", "model.rays_per_asset=128", "resume=never",
]
# The tiny prior at twice its width (64, head width 16): at width 32, "a red cube" came out as a blue cube or as a
# shapeless blend in some seeds (75 % instead of 100 %, guidance 6 included); width 64 got every prompt right.
PRIOR = [
    "experiment=tiny_prior", "model.denoiser.width=64", "model.denoiser.heads=4",
    f"trainer.max_steps={PRIOR_STEPS}", f"trainer.ckpt_every={PRIOR_STEPS}",
    "trainer.eval_every=0", f"trainer.log_every={max(1, PRIOR_STEPS // 10)}", f"trainer.batch_size={N_ASSETS}",
    "trainer.optimizer.lr=3e-3", "trainer.lr_schedule.warmup_steps=20", "trainer.ema.halflife_ksamples=0.4",
    f"trainer.seed={SEED}", "resume=never",
]


# The world of the records, in memory: the references the samples are compared with.
WORLD = toy_assets(N_ASSETS, shapes=SHAPES, colors=COLORS, random_rotation=False)


def extract_latent(root: Path, asset_id: str) -> torch.Tensor:
    """The stored latent ``[n_ctx, d_latent]`` of one asset (``scripts/extract_latents.py``'s output)."""
    from shapee.data.latents import LatentDataset

    dataset = LatentDataset(root, cond="text")
    return torch.as_tensor(dataset[dataset.asset_ids.index(asset_id)]["latent"]).float()


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Records → encoder → latents → prior → samples, with the process CPU seconds of each step."""
    out = tmp_path_factory.mktemp("prior_learning")
    cpu: dict[str, float] = {}

    def step(name, fn, *args):
        t = time.process_time()
        result = fn(*args)
        cpu[name] = time.process_time() - t
        return result

    records, latents = out / "records", out / "latents"
    encoder = out / "encoder" / "checkpoints" / "snapshot.pt"
    prior = out / "prior" / "checkpoints" / "snapshot.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models are per-op overhead bound: one thread is the fastest on 2 shared cores
    try:
        step("prepare", lambda: prepare_dataset(OmegaConf.to_container(
            _compose("prepare_data", [*TOY_WORLD, f"out={records}"]), resolve=True)))
        step("encoder", train_encoder, _compose(
            "train_encoder", [*ENCODER, f"data.root={records}", f"run_dir={out / 'encoder'}"]))
        step("extract", extract_latents, OmegaConf.to_container(_compose("extract_latents", [
            f"records={records}", f"transmitter={encoder}", f"out={latents}", "device=cpu", "progress=false",
            "num_workers=0"]), resolve=True))
        prior_metrics = step("prior", train_diffusion, _compose(
            "train_diffusion", [*PRIOR, f"data.root={latents}", f"run_dir={out / 'prior'}"]))
        pipe = TextTo3D.from_checkpoints(prior=prior, transmitter=encoder, device="cpu")
        generation = step("sample", lambda: pipe.generate(
            PROMPTS, n=N_SAMPLES, seed=SEED, guidance_scale=GUIDANCE, steps=SAMPLER_STEPS, grid_size=GRID,
            render_views=0))
        # The encoder alone, on the training latents: what the prior's samples can be at best.
        stored = [extract_latent(latents, asset.asset_id) for asset in WORLD]
        recon = step("reconstruct", lambda: pipe.extract_meshes(torch.stack(stored), grid_size=GRID))
    finally:
        torch.set_num_threads(threads)
    print(f"\nCPU seconds (seed {SEED}): " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + f", total {sum(cpu.values()):.1f}")
    return {"pipe": pipe, "generation": generation, "recon": recon, "prior_metrics": prior_metrics, "cpu": cpu}


@pytest.fixture(scope="module")
def references() -> ToyReferences:
    return ToyReferences.from_assets(WORLD)


def test_random_weight_clip_tells_the_prompts_apart(chain):
    # The tiny CLIP has random weights (pretrained=None): it knows no words, but different token sequences still
    # give different embeddings, which is all the prior needs to tell its training captions apart.
    emb = chain["pipe"].prior.embed_prompts(PROMPTS)  # [4, 32], L2-normalised
    cos = emb @ emb.T  # [4, 4]
    off_diagonal = cos[~torch.eye(len(PROMPTS), dtype=torch.bool)]
    assert float(off_diagonal.max()) < 0.99
    assert torch.allclose(chain["pipe"].prior.embed_prompts(PROMPTS), emb)  # deterministic


def test_encoder_meshes_are_recognisable(chain, references):
    # The decoder side first: the training latents themselves decode to their own shape and colour.
    meshes = [m.to_trimesh() for m in chain["recon"]]
    result = toy_match_rate(meshes, [a.captions[0] for a in WORLD], references)
    print("\nencoder reconstructions: " + format_toy_match(result))
    assert result["n_empty"] == 0
    assert result["rate"] >= 0.75


def test_prior_samples_match_their_prompt(chain, references):
    generation = chain["generation"]
    assert len(generation.meshes) == len(PROMPTS) * N_SAMPLES
    result = toy_match_rate(generation.meshes, generation.sources, references)
    print(f"\nprior samples (seed {SEED}, {N_SAMPLES} per prompt, guidance {GUIDANCE}): " + format_toy_match(result))
    # Issue 5: at least 80 % of the samples are nearer their own prompt's shape and colour than the others.
    assert result["rate"] >= 0.8, format_toy_match(result)
    # And no prompt is left behind: every one is drawn right more often than not.
    assert min(result["per_prompt"].values()) > 0.5, format_toy_match(result)
