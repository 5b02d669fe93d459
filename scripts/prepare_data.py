"""Prepare a dataset of asset records from meshes (or the toy world). See configs/prepare_data.yaml.

    python scripts/prepare_data.py input=<folder or glob> out=<folder> [captions=<file>] [views=20]
        [resolution=256] [workers=N] [shard=i/n]
    python scripts/prepare_data.py data=toy n=64 out=<folder>

Resumes (assets already in the manifest are skipped); broken assets go to out/failures.jsonl and the run goes on.
"""

import json
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    from shapee.data.prepare import PrepareError, prepare_dataset

    try:
        summary = prepare_dataset(cfg)
    except PrepareError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
