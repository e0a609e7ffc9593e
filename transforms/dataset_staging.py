"""StagedDataset: a dataset folder that appears only once it is complete.

    staged = StagedDataset("/data/training-0800")    # refuses nothing; the caller checks
    events | WriteTrainingDataset(staged.data_dir, staged.temp_dir)
    ...run the job...
    staged.publish(manifest, overwrite=False)         # or staged.discard() when it failed

Everything is written under ``<output>.tmp-<random>`` beside the output, on
the same file system, so publishing is one rename: a reader sees no folder, or
the whole dataset with its ``_manifest.json``, never a part of it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

from transforms.dataset import arrange_partitions


class StagedDataset:
    """A staging folder for ``output``: ``data_dir`` for the files, ``temp_dir`` for the writer's own."""

    def __init__(self, output: str):
        self.output = output
        self.staging = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
        self.data_dir = os.path.join(self.staging, "data")
        self.temp_dir = os.path.join(self.staging, "_temp")

    def publish(self, manifest: dict, overwrite: bool) -> None:
        """Files the Parquet files by partition, writes the manifest beside them
        (with their count, as ``files``) and renames the folder into place."""
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        os.makedirs(self.data_dir, exist_ok=True)
        manifest["files"] = arrange_partitions(self.data_dir)
        with open(os.path.join(self.data_dir, "_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if overwrite and os.path.exists(self.output):
            shutil.rmtree(self.output)
        os.rename(self.data_dir, self.output)
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        """Removes whatever a failed job left, so nothing looks complete."""
        shutil.rmtree(self.staging, ignore_errors=True)
