"""Encode prepared records into latents for the diffusion prior. See configs/extract_latents.yaml.

    python scripts/extract_latents.py records=<records> encoder=<snapshot.pt | transmitter.pt> out=<latents>
        [batch_size=8] [cond=text|image] [encoder_format=auto|shapee|official]
    torchrun --nproc_per_node=8 scripts/extract_latents.py records=... encoder=... out=...

Resumable: assets already listed in <out>/manifest*.jsonl are skipped. A broken record (unreadable, wrong shapes) is
skipped and recorded in <out>/failures.jsonl and the run goes on (exit 0; the summary counts them); reruns skip
recorded failures too unless retry_failed=true.
"""

import json
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract_latents")
def main(cfg: DictConfig) -> None:
    from shapee.io import CheckpointError
    from shapee.train.extract import EncoderLoadError, extract_latents

    try:
        summary = extract_latents(cfg)
    except (EncoderLoadError, CheckpointError, FileNotFoundError) as e:
        print(f"extract_latents: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
