"""Evaluate encoder checkpoints (Table 1) or a text prior (CLIP R-Precision). See configs/evaluate.yaml; each task's
settings, defaults and meanings: shapee/eval/config.py.

    python scripts/evaluate.py task=encoder transmitter=runs/encoder_nerf/checkpoints/snapshot.pt data.root=<records>
    python scripts/evaluate.py task=generation prior=runs/prior_text/checkpoints/snapshot.pt prompts=prompts.txt \
        transmitter=runs/encoder_finetune/checkpoints/snapshot.pt
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import (
    UserError, check_command_line, require_dataset, require_file, require_files, require_key, user_errors,
)
from shapee.eval.config import TASKS, merge_settings, register_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def check_inputs(cfg: DictConfig) -> None:
    """The files the task reads and its settings, before any model is built."""
    if cfg.task == "encoder":
        require_files(cfg, "transmitter", "<transmitter snapshot / checkpoint / transmitter.pt, or a list of them>")
        require_dataset(cfg, "data.root", "<folder of prepared records (scripts/prepare_data.py)>")
    else:
        require_file(cfg, "prior", "<text prior snapshot.pt>")
        require_file(cfg, "transmitter", "<transmitter snapshot or transmitter.pt that decodes the prior's latents>")
        require_key(cfg, "prompts", "<prompts .txt (one per line) or .json list>")
        if isinstance(cfg.prompts, str):
            require_file(cfg, "prompts", "<prompts .txt (one per line) or .json list>")
    try:
        merge_settings(TASKS[cfg.task], cfg)  # e.g. a key added with +key= that the task does not have
    except ValueError as e:
        raise UserError(str(e)) from None


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
    register_configs()  # the task schemas that configs/task/*.yaml extend
    check_command_line("evaluate", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
