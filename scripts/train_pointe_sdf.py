"""Train Point-E's SDF regressor (the distillation teacher, reference §9) on prepared records.
See configs/train_pointe_sdf.yaml.

    python scripts/train_pointe_sdf.py data.root=<records>
    python scripts/train_pointe_sdf.py data.root=<records> init_official=sdf.pt      # fine-tune the released model
    python scripts/train_pointe_sdf.py model=pointe_sdf_tiny trainer=tiny data.root=<toy records>   # CPU, seconds
    torchrun --nproc_per_node=8 scripts/train_pointe_sdf.py data.root=<records>
"""

import json

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_pointe_sdf")
def main(cfg: DictConfig) -> None:
    from shapee.train.pointe_sdf import train_pointe_sdf

    metrics = train_pointe_sdf(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))


if __name__ == "__main__":
    main()
