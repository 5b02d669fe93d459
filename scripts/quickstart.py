"""The whole pipeline on a CPU in minutes, with tiny presets: the embedded default of shapee.

    python scripts/quickstart.py [--out quickstart] [--nerf-steps 100] [--distill-steps 300] [--finetune-steps 5]
                                 [--prior-steps 3000] [--sample-steps 16] [--guidance 6] [--prompt "a red cube"]

1. a toy world of 8 upright assets, spheres and cubes in red and blue → records (scripts/prepare_data.py data=toy)
2. encoder stage nerf → distill (init_from) → finetune (init_from)   (scripts/train_encoder.py experiment=tiny_*)
3. latents of every record (scripts/extract_latents.py)
4. tiny text prior (scripts/train_diffusion.py experiment=tiny_prior)
5. sample the prompt → mesh (.glb/.ply) + STF turntable (.gif) + latent (scripts/sample.py)

Each step calls the script's library function with the script's own Hydra config, in this one process. Everything
resumes: running it again with the same --out skips what is done. A training stage stopped by SIGTERM/SIGINT writes
its checkpoint and the quick start stops there (one line, exit code 3) instead of going on from a partial stage; the
rerun finishes that stage from its checkpoint before it starts the next. The recipe is the one of the prior's learning test
(tests/test_prior_learning.py: every sample has its prompt's shape and colour there): the tiny encoder, a 64-wide
tiny denoiser, every asset in every batch. The tiny CLIP has random weights, so the prompt should be one of
the toy world's captions: "a red cube", "a blue sphere", "a cube that is red", ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(REPO))

from shapee.cli import user_errors  # noqa: E402  (light: no torch)


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from shapee.settings import register_sample_config

    register_sample_config()  # configs/sample.yaml extends shapee.settings.SampleConfig
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _trainer(steps: int, lr: float, warmup: int) -> list[str]:
    # Every asset in every batch; one evaluation and one checkpoint, at the end (evaluation renders cost more than
    # the tiny steps).
    return [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}",
            f"trainer.batch_size={N_ASSETS}", f"trainer.optimizer.lr={lr}", f"trainer.lr_schedule.warmup_steps={warmup}",
            "trainer.ema.halflife_ksamples=0.4", f"trainer.log_every={max(1, steps // 10)}",
            "trainer.progress_bar=true"]  # shown when stderr is a terminal (shapee.cli.progress_enabled)


N_ASSETS = 8  # two of every (shape, colour)
TOY_WORLD = ["data=toy", f"n={N_ASSETS}", "data.shapes=[sphere,cube]", "data.colors=[red,blue]",
             "data.random_rotation=false"]
# The stages' own settings on top of experiment=tiny_<stage> (tests/test_prior_learning.py). The preset's 32-wide MLP
# (latents [128, 64], what the tiny prior models): a 64-wide one renders sharper NeRF views (tests/test_learning.py)
# but doubles the latent rows.
ENCODER: list[str] = []
STAGE = {
    "nerf": (3e-3, 20, []),
    "distill": (3e-3, 20, []),
    # The mesh-render loss on one training view per asset at 32²: PyTorch3D's CPU rasteriser is slow.
    "finetune": (5e-4, 5, ["stage.stf_views=1", "stage.stf_resolution=32"]),
}
PRIOR = ["model.denoiser.width=64", "model.denoiser.heads=4"]


@user_errors("quickstart")
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="quickstart", help="folder for everything (records, runs, latents, samples)")
    parser.add_argument("--nerf-steps", type=int, default=100, help="training steps of encoder stage nerf")
    parser.add_argument("--distill-steps", type=int, default=300, help="training steps of encoder stage distill")
    parser.add_argument("--finetune-steps", type=int, default=5, help="training steps of encoder stage finetune")
    parser.add_argument("--prior-steps", type=int, default=3000, help="training steps of the prior")
    parser.add_argument("--sample-steps", type=int, default=16, help="Karras sampler steps")
    parser.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--workers", type=int, default=0, help="processes preparing the toy records (0: this one)")
    args = parser.parse_args(argv)
    for name in ("nerf_steps", "distill_steps", "finetune_steps", "prior_steps", "sample_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    from omegaconf import OmegaConf

    from shapee.data.prepare import prepare_dataset
    from shapee.sample import format_report, sample_assets
    from shapee.train.diffusion import train_diffusion
    from shapee.train.chain import Chain
    from shapee.train.encoder import train_encoder
    from shapee.train.extract import extract_latents

    from shapee.cli import progress_enabled

    progress = str(progress_enabled()).lower()  # bars when stderr is a terminal, unless SHAPEE_PROGRESS=0
    out = Path(args.out).resolve()
    records, latents, runs = out / "records", out / "latents", out / "runs"
    chain = Chain(total=7)  # stops at a training stage that did not finish (SIGTERM/SIGINT): exit 3, rerun resumes it
    times = chain.times
    t_all = time.perf_counter()

    def step(name: str, fn, cfg, run_dir=None, made=None, built_from=()):
        return chain.run(name, fn, cfg, run_dir=run_dir, made=made, built_from=built_from)

    # 1. Toy records at the tiny transmitter's sizes (configs/experiment/tiny_nerf.yaml says what it needs).
    step("prepare toy world", lambda c: prepare_dataset(OmegaConf.to_container(c, resolve=True)), _compose(
        "prepare_data",
        [*TOY_WORLD, f"out={records}", "resolution=64", "views=4", "targets=6", "pc_resolution=64", "pc_views=8",
         "n_points=1024", "sdf_uniform=4096", "sdf_near=4096", f"workers={args.workers}", f"progress={progress}"],
    ))
    # 2. The three encoder stages, each starting from the previous one's snapshot (paper §3.1).
    previous = None
    steps = {"nerf": args.nerf_steps, "distill": args.distill_steps, "finetune": args.finetune_steps}
    for stage in ("nerf", "distill", "finetune"):
        run_dir = runs / f"tiny_{stage}"
        lr, warmup, extra = STAGE[stage]
        overrides = [f"experiment=tiny_{stage}", f"data.root={records}", f"run_dir={run_dir}", *ENCODER,
                     *_trainer(steps[stage], lr, warmup), *extra]
        if previous is not None:
            overrides.append(f"init_from={previous}")
        step(f"train encoder ({stage})", train_encoder, _compose("train_encoder", overrides), run_dir=run_dir,
             built_from=[previous] if previous is not None else [])
        previous = run_dir / "checkpoints" / "snapshot.pt"
    encoder = previous
    # 3. Latents of every asset, with their captions.
    step("extract latents", extract_latents, _compose(
        "extract_latents",
        [f"records={records}", f"transmitter={encoder}", f"out={latents}", "device=cpu", "num_workers=0",
         f"progress={progress}"],
    ), made=latents / "manifest.jsonl", built_from=[encoder])
    # 4. The tiny text prior.
    prior_dir = runs / "tiny_prior_text"
    step("train prior", train_diffusion, _compose(
        "train_diffusion",
        ["experiment=tiny_prior", f"data.root={latents}", f"run_dir={prior_dir}", *PRIOR,
         *_trainer(args.prior_steps, 3e-3, 20), f"transmitter={encoder}"],
    ), run_dir=prior_dir, built_from=[latents / "manifest.jsonl"])
    # 5. Sample the prompt: mesh + turntable + latent.
    sample_cfg = _compose("sample", [
        f"prompt={args.prompt!r}".replace("'", '"'), f"prior={prior_dir / 'checkpoints' / 'snapshot.pt'}",
        f"transmitter={encoder}", f"out={out / 'samples'}", f"steps={args.sample_steps}", "grid_size=64",
        f"guidance_scale={args.guidance}",
        "render_views=20", "render_resolution=64", "device=cpu", f"progress={progress}",
    ])
    summary = step("sample", lambda c: sample_assets(OmegaConf.to_container(c, resolve=True)), sample_cfg)
    print("\n" + format_report(summary))
    if summary["files"][0]["faces"] == 0:
        # Tiny, briefly trained encoders can end with an SDF head that is negative everywhere (no surface); the
        # NeRF density usually still holds the shape, so decode the same latent that way too instead of stopping.
        print(f"\nnote: the STF (SDF) mesh of {args.prompt!r} is empty: the tiny encoder's SDF head has no surface "
              f"after {args.distill_steps} distill steps. Decoding with head=nerf into {out / 'samples_nerf'}.")
        nerf_cfg = OmegaConf.to_container(sample_cfg, resolve=True)
        nerf_cfg.update(head="nerf", out=str(out / "samples_nerf"))
        nerf_summary = step("sample (nerf)", sample_assets, nerf_cfg)
        print("\n" + format_report(nerf_summary))
        if nerf_summary["files"][0]["faces"] > 0:
            summary = nerf_summary
        else:
            print("note: the NeRF-density mesh is empty too: train longer (--nerf-steps, --distill-steps, --prior-steps)")
    total = time.perf_counter() - t_all
    print("\nquickstart stage times:")
    for name, seconds in times.items():
        print(f"  {name:<26} {seconds:8.1f} s")
    print(f"  {'total':<26} {total:8.1f} s")
    first = summary["files"][0]
    print(f"\nmesh: {first['mesh_files'][0]}\nturntable: {first.get('gif')}")
    return {"times": times, "total": total, "sample": summary}


if __name__ == "__main__":
    main()
