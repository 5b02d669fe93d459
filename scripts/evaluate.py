"""Evaluate encoder checkpoints (Table 1) or a text prior (CLIP R-Precision). See configs/evaluate.yaml.

    python scripts/evaluate.py task=encoder ckpt=runs/encoder_nerf/checkpoints/snapshot.pt data.root=<records>
    python scripts/evaluate.py task=generation ckpt=runs/prior_text/checkpoints/snapshot.pt prompts=prompts.txt \
        transmitter=runs/encoder_finetune/checkpoints/snapshot.pt
"""

import hydra
from omegaconf import DictConfig

from shapee.cli import UserError, refuse_renamed_keys, require_dataset, require_file, require_files, require_key, user_errors


def check_inputs(cfg: DictConfig) -> None:
    """The files each task reads, before any model is built."""
    task = require_key(cfg, "task", "encoder|generation")
    if task not in ("encoder", "generation"):
        raise UserError(f"task={task!r}: pass task=encoder or task=generation")
    if task == "encoder":
        require_files(cfg, "ckpt", "<transmitter snapshot / checkpoint / transmitter.pt, or a list of them>")
        require_dataset(cfg, "data.root", "<folder of prepared records (scripts/prepare_data.py)>")
    else:
        require_file(cfg, "ckpt", "<text prior snapshot.pt>")
        require_file(cfg, "transmitter", "<transmitter snapshot or transmitter.pt that decodes the prior's latents>")
        prompts = require_key(cfg, "prompts", "<prompts .txt (one per line) or .json list>")
        if isinstance(prompts, str):
            require_file(cfg, "prompts", "<prompts .txt (one per line) or .json list>")


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
@user_errors("evaluate", "builtins.FileNotFoundError")
def main(cfg: DictConfig) -> None:
    check_inputs(cfg)
    from shapee.eval.run import evaluate

    results = evaluate(cfg)
    print(results["markdown"])
    if cfg.out:
        print(f"results written to {cfg.out}/results.json, results.md and grids/")


if __name__ == "__main__":
    refuse_renamed_keys("evaluate")
    main()
