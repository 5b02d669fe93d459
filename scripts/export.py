"""Export a shapee-trained prior and/or transmitter decoder to diffusers' Shap-E folder layout. See configs/export.yaml.

    python scripts/export.py format=diffusers prior=<prior snapshot> transmitter=<encoder snapshot> out=<folder>
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from shapee.io import CheckpointError, OfficialCheckpointError
    from shapee.io.loading import EncoderLoadError

    def fail(message: str) -> None:
        print(f"export: error: {message}", file=sys.stderr)
        sys.exit(2)

    if cfg.format != "diffusers":
        fail(f"format={cfg.format!r} is not supported; use format=diffusers")
    if not cfg.out:
        fail("out=<folder> is required")
    if not cfg.prior and not cfg.transmitter:
        fail("give prior=<prior snapshot> and/or transmitter=<encoder snapshot>")
    for key in ("prior", "transmitter"):
        if cfg[key] and not Path(cfg[key]).exists():
            fail(f"{key}={cfg[key]!r} does not exist")

    from shapee.io.diffusers_format import export_diffusers
    from shapee.io.loading import load_prior, load_transmitter

    try:
        prior = load_prior(cfg.prior, official_name=cfg.prior_official) if cfg.prior else None
        transmitter = load_transmitter(cfg.transmitter) if cfg.transmitter else None
        out = export_diffusers(cfg.out, prior=prior, transmitter=transmitter)
    except (ValueError, FileNotFoundError, CheckpointError, OfficialCheckpointError, EncoderLoadError, ImportError) as e:
        fail(str(e))
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


if __name__ == "__main__":
    main()
