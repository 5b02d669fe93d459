"""Train the latent diffusion prior. See configs/train_diffusion.yaml.

    python scripts/train_diffusion.py cond=text data.root=<latents>
    python scripts/train_diffusion.py cond=image data.root=<latents> init_official=image_cond.pt
    python scripts/train_diffusion.py experiment=tiny_prior data.root=<tiny latents>
    torchrun --nproc_per_node=8 scripts/train_diffusion.py cond=text data.root=<latents>
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import StageInterrupted, check_command_line, check_training_inputs, user_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # @hydra.main's config_path

DATA_HINT = "<folder of latents (scripts/extract_latents.py)>"


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_diffusion")
@user_errors("train_diffusion")
def main(cfg: DictConfig) -> None:
    check_training_inputs(cfg, data_hint=DATA_HINT)  # in seconds, before a model is built
    from shapee.train.diffusion import train_diffusion

    metrics = train_diffusion(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    if not metrics["finished"]:  # stopped by SIGTERM/SIGINT after its checkpoint: exit 3, a rerun resumes
        raise StageInterrupted("the run", metrics["step"], metrics["max_steps"], cfg.run_dir)


if __name__ == "__main__":
    check_command_line("train_diffusion", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
