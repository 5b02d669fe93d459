"""Train Point-E's SDF regressor (the distillation teacher, reference §9) on prepared records.
See configs/train_pointe_sdf.yaml.

    python scripts/train_pointe_sdf.py data.root=<records>
    python scripts/train_pointe_sdf.py data.root=<records> init_official=sdf.pt      # fine-tune the released model
    python scripts/train_pointe_sdf.py model=pointe_sdf_tiny trainer=tiny data.root=<toy records>   # CPU, seconds
    torchrun --nproc_per_node=8 scripts/train_pointe_sdf.py data.root=<records>
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import StageInterrupted, check_command_line, check_training_inputs, user_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # @hydra.main's config_path

DATA_HINT = "<folder of prepared records (scripts/prepare_data.py)>"


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_pointe_sdf")
@user_errors("train_pointe_sdf")
def main(cfg: DictConfig) -> None:
    check_training_inputs(cfg, data_hint=DATA_HINT)  # in seconds, before a model is built
    from shapee.train.pointe_sdf import train_pointe_sdf

    metrics = train_pointe_sdf(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    if not metrics["finished"]:  # stopped by SIGTERM/SIGINT after its checkpoint: exit 3, a rerun resumes
        raise StageInterrupted("the run", metrics["step"], metrics["max_steps"], cfg.run_dir)


if __name__ == "__main__":
    check_command_line("train_pointe_sdf", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
