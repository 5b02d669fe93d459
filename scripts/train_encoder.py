"""Train the Shap-E encoder, one stage at a time. See configs/train_encoder.yaml.

    python scripts/train_encoder.py stage=nerf data.root=<records>
    python scripts/train_encoder.py experiment=tiny_nerf data.root=<toy records>
    torchrun --nproc_per_node=8 scripts/train_encoder.py stage=nerf data.root=<records>
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import StageInterrupted, check_command_line, check_training_inputs, require_file, user_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # @hydra.main's config_path

DATA_HINT = "<folder of prepared records (scripts/prepare_data.py)>"


@hydra.main(version_base="1.3", config_path="../configs", config_name="train_encoder")
@user_errors("train_encoder")
def main(cfg: DictConfig) -> None:
    check_training_inputs(cfg, data_hint=DATA_HINT)  # in seconds, before a model is built
    if cfg.stage.get("teacher") == "pointe":
        require_file(cfg, "stage.teacher_checkpoint", "<Point-E SDF snapshot (scripts/train_pointe_sdf.py) or sdf.pt>")
    from shapee.train.encoder import train_encoder

    metrics = train_encoder(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    if not metrics["finished"]:  # stopped by SIGTERM/SIGINT after its checkpoint: exit 3, a rerun resumes
        raise StageInterrupted("the run", metrics["step"], metrics["max_steps"], cfg.run_dir)


if __name__ == "__main__":
    check_command_line("train_encoder", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
