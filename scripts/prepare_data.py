"""Prepare a dataset of asset records from meshes (or the toy world). See configs/prepare_data.yaml.

    python scripts/prepare_data.py input=<folder or glob> out=<folder> [captions=<file>] [views=20]
        [resolution=256] [workers=N] [shard=i/n]
    python scripts/prepare_data.py data=toy n=64 out=<folder>

Resumes (assets already in the manifest are skipped); broken assets go to out/failures.jsonl and the run goes on.
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from shapee.cli import check_command_line, fail, user_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # @hydra.main's config_path


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
@user_errors("prepare_data", "shapee.data.prepare.PrepareError")
def main(cfg: DictConfig) -> None:
    from shapee.data.prepare import prepare_dataset

    summary = prepare_dataset(cfg)  # checks the command (input, out, shard, ...) before touching any asset
    print(json.dumps(summary, indent=2))
    if summary["records"] == 0:  # every input failed (or none was found): nothing to train on is not a success
        failures = f"; why: {summary['out']}/failures*.jsonl" if summary["failed"] or summary["skipped_failed"] else ""
        fail("prepare_data", f"no record was produced: {summary['failed'] + summary['skipped_failed']} of "
             f"{summary['assigned']} assets failed{failures}", 1)


if __name__ == "__main__":
    check_command_line("prepare_data", CONFIGS)  # a bad command line: one line, exit 2, before Hydra parses it
    main()
