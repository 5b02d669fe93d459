"""Sample 3D assets (meshes, turntable GIFs, latents) from a prior. See configs/sample.yaml.

    python scripts/sample.py prompt="a red cube" prior=<prior snapshot> transmitter=<encoder snapshot> out=samples
    python scripts/sample.py image=photo.png prior=<image prior snapshot> transmitter=<encoder snapshot>
    python scripts/sample.py prompt="a chair" checkpoint=official n=4 guidance_scale=15
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    from shapee.conditioning import CLIPUnavailableError
    from shapee.io import CheckpointError
    from shapee.io.download import OfficialDownloadError
    from shapee.pipeline import format_report, sample_assets

    try:
        summary = sample_assets(OmegaConf.to_container(cfg, resolve=True))
    except (ValueError, FileNotFoundError, CheckpointError, CLIPUnavailableError, OfficialDownloadError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(summary))


if __name__ == "__main__":
    main()
