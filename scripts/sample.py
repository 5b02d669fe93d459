"""Sample 3D assets (meshes, turntable GIFs, latents) from a prior. See configs/sample.yaml.

    python scripts/sample.py prompt="a red cube" prior=<prior snapshot> transmitter=<encoder snapshot> out=samples
    python scripts/sample.py image=photo.png prior=<image prior snapshot> transmitter=<encoder snapshot>
    python scripts/sample.py prompt="a chair" checkpoint=official n=4 guidance_scale=15
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from shapee.cli import (
    UserError, check_command_line, is_diffusers_folder, progress_enabled, require_weights, user_errors,
)
from shapee.settings import register_sample_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def check_inputs(cfg: DictConfig) -> None:
    """Weights and inputs, before any model is built (``head=`` is the stf|nerf head, ``transmitter=`` the
    weights that decode latents)."""
    if (cfg.prompt is None) == (cfg.image is None):
        raise UserError('give exactly one of prompt="..." (text prior) or image=<file> (image prior)')
    if cfg.checkpoint not in ("ours", "official") and not is_diffusers_folder(Path(str(cfg.checkpoint))):
        raise UserError(
            f"checkpoint={cfg.checkpoint!r}: pass checkpoint=ours, checkpoint=official or checkpoint=<diffusers Shap-E "
            "folder with prior/ and shap_e_renderer/>"
        )
    if cfg.head not in ("stf", "nerf"):
        raise UserError(f"head={cfg.head!r}: pass head=stf or head=nerf (the transmitter's head)")
    if cfg.checkpoint == "ours":
        missing = [k for k in ("prior", "transmitter") if not cfg.get(k)]
        if missing:
            raise UserError(
                f"{' and '.join(missing)} not set: pass prior=<prior snapshot.pt> transmitter=<encoder snapshot.pt> "
                "(e.g. runs/prior_text/checkpoints/snapshot.pt, runs/encoder_finetune/checkpoints/snapshot.pt), "
                "or checkpoint=official for the released weights"
            )
        require_weights(cfg, "prior", "<prior snapshot.pt or diffusers folder>")
        require_weights(cfg, "transmitter", "<encoder snapshot.pt (the one the prior's latents came from)>")
    else:  # official, or a diffusers folder: prior= / transmitter= may replace one of its models
        require_weights(cfg, "prior", "<released text_cond.pt / image_cond.pt>", optional=True)
        require_weights(cfg, "transmitter", "<released transmitter.pt>", optional=True)
    if cfg.image is not None:
        for path in [cfg.image] if isinstance(cfg.image, str) else list(cfg.image):
            if not Path(str(path)).is_file():
                raise UserError(f"image={str(path)!r}: no such file; pass image=<image file>")


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
@user_errors("sample", "builtins.ValueError", "builtins.FileNotFoundError",
             "shapee.conditioning.clip.CLIPUnavailableError", "shapee.io.download.OfficialDownloadError")
def main(cfg: DictConfig) -> None:
    check_inputs(cfg)
    from shapee.sample import format_report, sample_assets

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["progress"] = progress_enabled(cfg.progress)  # the sampler's bar: on a terminal, unless progress=false
    summary = sample_assets(plain)
    print(format_report(summary))


if __name__ == "__main__":
    register_sample_config()  # the schema configs/sample.yaml extends (shapee.settings.SampleConfig)
    check_command_line("sample", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
