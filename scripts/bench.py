"""Benchmarks: ``python scripts/bench.py [<name>] [options]``; prints a table and writes JSON.

    python scripts/bench.py                       # = all: every benchmark below, sized for this machine
    python scripts/bench.py all [--quick] [--json runs/bench/all.json]
    python scripts/bench.py prepare_data [--asset mesh.obj ...] [--repeats 3] [--warmup 1] [--set views=2 ...]
        [--json runs/bench/prepare_data.json]
    python scripts/bench.py marching_cubes [--grid 128] [--threads 1] [--device cuda] [--batch 8]
    python scripts/bench.py latent_to_mesh [--grid 128] [--repeats 1] [--warmup 0] [--dense]
    python scripts/bench.py encoder [--batch-size 1] [--no-backward] [--checkpoint] [--precision auto|bf16|fp32]
        [--repeats 3] [--warmup 1] [--json runs/bench/encoder.json]
    python scripts/bench.py nerf [--precision auto|bf16|fp32]           # rays/s, seconds per 64² view
    python scripts/bench.py denoiser [--batch-size 2] [--cond text|image] [--compile] [--cuda-graph]
    python scripts/bench.py prompt_to_mesh [--steps 64] [--guidance 15] [--grid 128] [--no-cuda-graph]
    python scripts/bench.py texture [--size 1024] [--faces 20000] [--model release|tiny]   # decimate + atlas + bake
    python scripts/bench.py train [--model encoder|prior] [--preset tiny|official] [--batch-size N] [--stage nerf]
        [--compile] [--checkpoint] [--[no-]fused-optimizer]

Add a benchmark: a function in ``shapee/benchmarks/<name>.py`` returning a JSON-ready dict and a sub-command here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_sets(pairs: list[str]) -> dict:
    """``["views=2", "backend=embree"]`` → ``{"views": 2, "backend": "embree"}`` (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"bench: --set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _write(result: dict, path: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from shapee.benchmarks.prepare import bench_prepare_data, format_table

    result = bench_prepare_data(args.asset, repeats=args.repeats, warmup=args.warmup, settings=_parse_sets(args.set))
    print(format_table(result))
    _write(result, args.json or "runs/bench/prepare_data.json")


def cmd_encoder(args: argparse.Namespace) -> None:
    from shapee.benchmarks.encoder import bench_encoder, bench_nerf, format_encoder_table

    enc = bench_encoder(batch_size=args.batch_size, backward=not args.no_backward, checkpoint=args.checkpoint,
                        precision=args.precision, repeats=args.repeats, warmup=args.warmup, device=args.device,
                        n_views=args.views, image_size=args.image_size, n_points=args.points)
    nerf = bench_nerf(precision=args.precision, repeats=args.repeats, warmup=args.warmup, device=args.device)
    print(format_encoder_table(enc, nerf))
    _write({"encoder": enc, "nerf": nerf}, args.json or "runs/bench/encoder.json")


def cmd_marching_cubes(args: argparse.Namespace) -> None:
    from shapee.benchmarks.marching_cubes import benchmark_marching_cubes

    r = benchmark_marching_cubes(args.grid, repeats=args.repeats, device=args.device, num_threads=args.threads,
                                 batch=args.batch)
    print(f"marching cubes {int(r['grid_size'])}³ on {args.device} ({int(r['threads'])} torch threads), best of "
          f"{args.repeats}: ours (MC33) {r['ours_s']:.3f} s, {int(r['ours_faces'])} faces | scikit-image lewiner "
          f"{r['skimage_s']:.3f} s, {int(r['skimage_faces'])} faces | ratio {r['ratio']:.2f}×")
    print(f"  one call of ours dispatches {int(r['ours_kernel_ops'])} computing tensor ops, {int(r['ours_view_ops'])} "
          f"views, {int(r['ours_data_dependent_ops'])} with a data-dependent size (+ 1 read of the sizes)")
    if "ours_batch_s" in r:
        print(f"  batch of {int(r['batch'])} fields in one call: {r['ours_batch_s']:.4f} s, {r['ours_per_field_s']:.4f} s "
              f"per field ({r['skimage_s'] / r['ours_per_field_s']:.1f}× faster than scikit-image per field)")
    _write(r, args.json or "runs/bench/marching_cubes.json")


def cmd_latent_to_mesh(args: argparse.Namespace) -> None:
    from shapee.benchmarks.stf import bench_latent_to_mesh

    r = bench_latent_to_mesh(args.grid, repeats=args.repeats, warmup=args.warmup, device=args.device, dense=args.dense)
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in r["median"].items())
    how = "dense grid" if args.dense else f"narrow band, {r['queries']:,} queries"
    print(f"latent → coloured mesh at {args.grid}³ (released-size decoder, {how}): {steps}")
    _write(r, args.json or "runs/bench/latent_to_mesh.json")


def cmd_nerf(args: argparse.Namespace) -> None:
    from shapee.benchmarks.encoder import bench_nerf
    from shapee.benchmarks.suite import format_nerf

    r = bench_nerf(precision=args.precision, repeats=args.repeats, warmup=args.warmup, device=args.device)
    print(format_nerf(r))
    _write(r, args.json or "runs/bench/nerf.json")


def cmd_denoiser(args: argparse.Namespace) -> None:
    from shapee.benchmarks.denoiser import bench_denoiser, format_denoiser_table

    r = bench_denoiser(batch_size=args.batch_size, cond=args.cond, precision=args.precision, device=args.device,
                       repeats=args.repeats, warmup=args.warmup, compile=args.compile, cuda_graph=args.cuda_graph)
    print(format_denoiser_table(r))
    _write(r, args.json or "runs/bench/denoiser.json")


def cmd_prompt_to_mesh(args: argparse.Namespace) -> None:
    from shapee.benchmarks.pipeline import bench_prompt_to_mesh, format_prompt_to_mesh

    r = bench_prompt_to_mesh(steps=args.steps, guidance_scale=args.guidance, grid_size=args.grid,
                             precision=args.precision, repeats=args.repeats, warmup=args.warmup, device=args.device,
                             cuda_graph=False if args.no_cuda_graph else None)
    print(format_prompt_to_mesh(r))
    _write(r, args.json or "runs/bench/prompt_to_mesh.json")


def cmd_texture(args: argparse.Namespace) -> None:
    from shapee.benchmarks.texture import bench_texture, format_texture

    r = bench_texture(texture_size=args.size, faces=args.faces or None, model=args.model, grid_size=args.grid,
                      repeats=args.repeats, warmup=args.warmup, device=args.device)
    print(format_texture(r))
    _write(r, args.json or "runs/bench/texture.json")


def cmd_train(args: argparse.Namespace) -> None:
    from shapee.benchmarks.training import bench_training, format_training_table

    models = ["encoder", "prior"] if args.model == "both" else [args.model]
    results = [bench_training(m, preset=args.preset, batch_size=args.batch_size, stage=args.stage,
                              precision=args.precision, checkpoint=args.checkpoint, repeats=args.repeats,
                              warmup=args.warmup, device=args.device, compile=args.compile,
                              fused_optimizer=args.fused_optimizer) for m in models]
    print(format_training_table(results))
    _write({"train": results}, args.json or "runs/bench/train.json")


def cmd_all(args: argparse.Namespace) -> None:
    from shapee.benchmarks.suite import format_suite, run_suite

    result = run_suite(quick=args.quick, device=args.device, log=print)
    print()
    print(format_suite(result))
    _write(result, args.json or "runs/bench/all.json")
    if result["failed"]:
        raise SystemExit(f"bench: {len(result['failed'])} benchmark(s) failed: {', '.join(result['failed'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name")

    p = sub.add_parser("all", help="every benchmark, sized for this machine (the default with no name)")
    p.add_argument("--quick", action="store_true", help="fewest repeats and the smallest sizes that still say something")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_all)

    p = sub.add_parser("prepare_data", help="seconds per asset of scripts/prepare_data.py, split by step")
    p.add_argument("--asset", action="append", help="mesh file (repeatable); default: shared/assets/good/capsule.obj")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="PrepareSettings override")
    p.add_argument("--json", default=None, help="where to write the JSON result")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("marching_cubes", help="Marching Cubes 33 on a 128³ field, ours vs scikit-image")
    p.add_argument("--grid", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for ours (default: torch's)")
    p.add_argument("--batch", type=int, default=1, help="also time one call on this many copies of the field")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_marching_cubes)

    p = sub.add_parser("latent_to_mesh", help="latent → coloured mesh time at the released decoder size")
    p.add_argument("--grid", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dense", action="store_true", help="query the whole grid (the official way) instead of the band")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_latent_to_mesh)

    p = sub.add_parser("encoder", help="released-size encoder forward/backward time and memory, NeRF rays/s")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--views", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--points", type=int, default=16384)
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing (what fits big batches on GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_encoder)

    p = sub.add_parser("nerf", help="NeRF rendering of the released-size MLP: rays/s, seconds per 64² view")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_nerf)

    p = sub.add_parser("denoiser", help="one forward of the released-size prior denoiser (text300M / image300M)")
    p.add_argument("--batch-size", type=int, default=2, help="2 = one prompt with guidance")
    p.add_argument("--cond", default="text", choices=["text", "image"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--cuda-graph", action="store_true", help="time replays of a captured CUDA graph of the forward")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_denoiser)

    p = sub.add_parser("prompt_to_mesh", help="prompt → 128³ mesh latency at released sizes: CLIP, sampling, decoding")
    p.add_argument("--steps", type=int, default=64, help="Karras steps (fewer on CPU: the 64-step time is estimated)")
    p.add_argument("--guidance", type=float, default=15.0)
    p.add_argument("--grid", type=int, default=128)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--no-cuda-graph", action="store_true", help="eager denoiser calls on CUDA (the 'before' number)")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_prompt_to_mesh)

    p = sub.add_parser("texture", help="decimate + UV atlas + texture baked from the colour head; file sizes")
    p.add_argument("--size", type=int, default=1024, help="texture size (texels per side)")
    p.add_argument("--faces", type=int, default=20_000, help="decimate to this many faces (0: keep the MC mesh)")
    p.add_argument("--model", default="release", choices=["release", "tiny"], help="colour head: released size or tiny")
    p.add_argument("--grid", type=int, default=128, help="marching-cubes grid of the benchmark surface")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_texture)

    p = sub.add_parser("train", help="training throughput (assets/s, latents/s), peak memory, MFU on GPU")
    p.add_argument("--model", default="both", choices=["encoder", "prior", "both"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "official"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 8/4 encoder, 32/16 prior (tiny/official)")
    p.add_argument("--stage", default="nerf", choices=["nerf", "distill", "finetune"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder / denoiser")
    p.add_argument("--fused-optimizer", default=None, action=argparse.BooleanOptionalAction,
                   help="AdamW's fused kernel (default: as the training loop, on CUDA)")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_train)

    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] or ["all"]))
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
