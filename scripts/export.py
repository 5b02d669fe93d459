"""Export a shapee-trained prior and/or transmitter decoder to diffusers' Shap-E folder layout. See configs/export.yaml.

    python scripts/export.py format=diffusers prior=<prior snapshot> transmitter=<encoder snapshot> out=<folder>
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import UserError, check_command_line, require_key, require_weights, user_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # @hydra.main's config_path


def check_inputs(cfg: DictConfig) -> None:
    """Before any model is loaded."""
    if cfg.format != "diffusers":
        raise UserError(f"format={cfg.format!r} is not supported; use format=diffusers")
    require_key(cfg, "out", "<output folder>")
    if not cfg.prior and not cfg.transmitter:
        raise UserError("give prior=<prior snapshot> and/or transmitter=<encoder snapshot>")
    require_weights(cfg, "prior", "<prior snapshot.pt>", optional=True)
    require_weights(cfg, "transmitter", "<encoder snapshot.pt>", optional=True)


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
@user_errors("export", "builtins.ValueError", "builtins.FileNotFoundError", "builtins.ImportError",
             "shapee.io.layout.OfficialCheckpointError", "shapee.io.loading.EncoderLoadError")
def main(cfg: DictConfig) -> None:
    check_inputs(cfg)
    from shapee.io.diffusers_format import export_diffusers
    from shapee.io.loading import load_model

    prior = load_model(cfg.prior, expect="prior", official_name=cfg.prior_official) if cfg.prior else None
    transmitter = load_model(cfg.transmitter, expect="transmitter") if cfg.transmitter else None
    out = export_diffusers(cfg.out, prior=prior, transmitter=transmitter)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


if __name__ == "__main__":
    check_command_line("export", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
