"""Evaluate encoder checkpoints (Table 1) or a text prior (CLIP R-Precision). See configs/evaluate.yaml.

    python scripts/evaluate.py task=encoder ckpt=runs/encoder_nerf/checkpoints/snapshot.pt data.root=<records>
    python scripts/evaluate.py task=generation ckpt=runs/prior_text/checkpoints/snapshot.pt prompts=prompts.txt \
        decoder=runs/encoder_finetune/checkpoints/snapshot.pt
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from shapee.eval.run import evaluate

    results = evaluate(cfg)
    print(results["markdown"])
    if cfg.out:
        print(f"results written to {cfg.out}/results.json, results.md and grids/")


if __name__ == "__main__":
    main()
