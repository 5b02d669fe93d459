"""Train the Shap-E encoder, one stage at a time. See configs/train_encoder.yaml.

    python scripts/train_encoder.py stage=nerf data.root=<records>
    python scripts/train_encoder.py experiment=tiny_nerf data.root=<toy records>
    torchrun --nproc_per_node=8 scripts/train_encoder.py stage=nerf data.root=<records>
"""

import json

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_encoder")
def main(cfg: DictConfig) -> None:
    from shapee.train.encoder import train_encoder

    metrics = train_encoder(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))


if __name__ == "__main__":
    main()
