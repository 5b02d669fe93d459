"""Train the latent diffusion prior. See configs/train_diffusion.yaml.

    python scripts/train_diffusion.py cond=text data.root=<latents>
    python scripts/train_diffusion.py cond=image data.root=<latents> init_official=image_cond.pt
    python scripts/train_diffusion.py experiment=tiny_prior data.root=<tiny latents>
    torchrun --nproc_per_node=8 scripts/train_diffusion.py cond=text data.root=<latents>
"""

import json

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_diffusion")
def main(cfg: DictConfig) -> None:
    from shapee.train.diffusion import train_diffusion

    metrics = train_diffusion(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))


if __name__ == "__main__":
    main()
