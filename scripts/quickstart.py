"""The whole pipeline on a CPU in minutes, with tiny presets: the embedded default of shapee.

    python scripts/quickstart.py [--out quickstart] [--assets 68] [--encoder-steps 40] [--prior-steps 300]
                                 [--sample-steps 16] [--prompt "a red cube"]

1. toy world → records (scripts/prepare_data.py data=toy, 64² views)
2. encoder stage nerf → distill (init_from) → finetune (init_from)   (scripts/train_encoder.py experiment=tiny_*)
3. latents of every record (scripts/extract_latents.py)
4. tiny text prior (scripts/train_diffusion.py experiment=tiny_prior)
5. sample the prompt → mesh (.glb/.ply) + STF turntable (.gif) + latent (scripts/sample.py)

Each step calls the script's library function with the script's own Hydra config, in this one process. Everything
resumes: running it again with the same --out skips what is done. The models are tiny and trained for seconds, so
the mesh is a blob at best; the point is that every stage runs, end to end, on any machine. The tiny CLIP has random
weights, so the prompt should be one of the toy world's captions (asset 67 of the toy world is "a red cube").
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _trainer(steps: int) -> list[str]:
    # One evaluation and one checkpoint, at the end: evaluation renders cost more than the tiny steps.
    return [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="quickstart", help="folder for everything (records, runs, latents, samples)")
    parser.add_argument("--assets", type=int, default=68, help="toy assets (68 includes asset 67, 'a red cube')")
    parser.add_argument("--encoder-steps", type=int, default=40, help="training steps of each encoder stage")
    parser.add_argument("--prior-steps", type=int, default=300, help="training steps of the prior")
    parser.add_argument("--sample-steps", type=int, default=16, help="Karras sampler steps")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--workers", type=int, default=0, help="processes preparing the toy records (0: this one)")
    args = parser.parse_args(argv)
    for name in ("assets", "encoder_steps", "prior_steps", "sample_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    from omegaconf import OmegaConf

    from shapee.data.prepare import prepare_dataset
    from shapee.pipeline import format_report, sample_assets
    from shapee.train.diffusion import train_diffusion
    from shapee.train.encoder import train_encoder
    from shapee.train.extract import extract_latents

    out = Path(args.out).resolve()
    records, latents, runs = out / "records", out / "latents", out / "runs"
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str, fn, cfg):
        print(f"\n=== {name}", flush=True)
        t = time.perf_counter()
        result = fn(cfg)
        times[name] = time.perf_counter() - t
        print(f"=== {name}: {times[name]:.1f} s", flush=True)
        return result

    # 1. Toy records at the tiny transmitter's sizes (configs/experiment/tiny_nerf.yaml says what it needs).
    step("prepare toy world", lambda c: prepare_dataset(OmegaConf.to_container(c, resolve=True)), _compose(
        "prepare_data",
        ["data=toy", f"n={args.assets}", f"out={records}", "resolution=64", "views=4", "targets=6",
         "pc_resolution=64", "pc_views=4", "n_points=1024", "sdf_uniform=1024", "sdf_near=1024",
         f"workers={args.workers}", "progress=false"],
    ))
    # 2. The three encoder stages, each starting from the previous one's snapshot (paper §3.1).
    previous = None
    for stage in ("nerf", "distill", "finetune"):
        run_dir = runs / f"tiny_{stage}"
        overrides = [f"experiment=tiny_{stage}", f"data.root={records}", f"run_dir={run_dir}",
                     *_trainer(args.encoder_steps)]
        if previous is not None:
            overrides.append(f"init_from={previous}")
        step(f"train encoder ({stage})", train_encoder, _compose("train_encoder", overrides))
        previous = run_dir / "checkpoints" / "snapshot.pt"
    encoder = previous
    # 3. Latents of every asset, with their captions.
    step("extract latents", extract_latents, _compose(
        "extract_latents",
        [f"records={records}", f"encoder={encoder}", f"out={latents}", "device=cpu", "num_workers=0", "progress=false"],
    ))
    # 4. The tiny text prior.
    prior_dir = runs / "tiny_prior_text"
    step("train prior", train_diffusion, _compose(
        "train_diffusion",
        ["experiment=tiny_prior", f"data.root={latents}", f"run_dir={prior_dir}", *_trainer(args.prior_steps),
         f"decoder={encoder}"],
    ))
    # 5. Sample the prompt: mesh + turntable + latent.
    sample_cfg = _compose("sample", [
        f"prompt={args.prompt!r}".replace("'", '"'), f"prior={prior_dir / 'checkpoints' / 'snapshot.pt'}",
        f"transmitter={encoder}", f"out={out / 'samples'}", f"steps={args.sample_steps}", "grid_size=64",
        "render_views=20", "render_resolution=64", "device=cpu",
    ])
    summary = step("sample", lambda c: sample_assets(OmegaConf.to_container(c, resolve=True)), sample_cfg)
    print("\n" + format_report(summary))
    if summary["files"][0]["faces"] == 0:
        # Tiny, briefly trained encoders can end with an SDF head that is negative everywhere (no surface); the
        # NeRF density usually still holds the shape, so decode the same latent that way too instead of stopping.
        print(f"\nnote: the STF (SDF) mesh of {args.prompt!r} is empty: the tiny encoder's SDF head has no surface "
              f"after {args.encoder_steps} steps per stage. Decoding with decoder=nerf into {out / 'samples_nerf'}.")
        nerf_cfg = OmegaConf.to_container(sample_cfg, resolve=True)
        nerf_cfg.update(decoder="nerf", out=str(out / "samples_nerf"))
        nerf_summary = step("sample (nerf)", sample_assets, nerf_cfg)
        print("\n" + format_report(nerf_summary))
        if nerf_summary["files"][0]["faces"] > 0:
            summary = nerf_summary
        else:
            print("note: the NeRF-density mesh is empty too: train longer (--encoder-steps, --prior-steps)")
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
