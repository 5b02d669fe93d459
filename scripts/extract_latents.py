"""Encode prepared records into latents for the diffusion prior. See configs/extract_latents.yaml.

    python scripts/extract_latents.py records=<records> transmitter=<snapshot.pt | transmitter.pt> out=<latents>
        [batch_size=8] [cond=text|image] [encoder_format=auto|shapee|official]
    torchrun --nproc_per_node=8 scripts/extract_latents.py records=... transmitter=... out=...

Resumable: assets already listed in <out>/manifest*.jsonl are skipped. A broken record (unreadable, wrong shapes) is
skipped and recorded in <out>/failures.jsonl and the run goes on (exit 0; the summary counts them); reruns skip
recorded failures too unless retry_failed=true.
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import check_command_line, require_dataset, require_file, require_finished, require_key, user_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # @hydra.main's config_path


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract_latents")
@user_errors("extract_latents", "shapee.io.loading.EncoderLoadError", "builtins.FileNotFoundError")
def main(cfg: DictConfig) -> None:
    # In seconds, before the encoder is built.
    require_dataset(cfg, "records", "<folder of prepared records (scripts/prepare_data.py)>")
    encoder = require_file(cfg, "transmitter", "<encoder snapshot.pt of a finished stage, or the released transmitter.pt>")
    require_finished(cfg, "transmitter", encoder)  # latents of a half-trained encoder would feed the prior silently
    require_key(cfg, "out", "<output folder for the latents>")
    from shapee.train.extract import extract_latents

    summary = extract_latents(cfg)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    check_command_line("extract_latents", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
