# Helpers shared by the rules: shard lists come from the cohort checkpoint, so the DAG has one job per
# shard (not per image) and grows with the cohort only through the shard count.
import functools
import hashlib
import json
import os

import polars as pl

MODELS = list(config["models"])
ENV = "../../envs/cohortlens.yaml"


def res(rule_name, key, default):
    """A resource for a rule from config['resources'][rule] (cluster users tune them there)."""
    return config.get("resources", {}).get(rule_name, {}).get(key, default)


@functools.cache
def _images_table(path, mtime_ns):
    return pl.read_parquet(path, columns=["image_uid", "region", "path", "shard"])


def cohort_images():
    path = checkpoints.cohort.get().output.images
    return _images_table(path, os.stat(path).st_mtime_ns)


def shard_ids(wildcards=None):
    return sorted(cohort_images()["shard"].unique().to_list())


def shard_images(wildcards):
    """The shard's image files: touching or adding one image reruns only its own shard."""
    rows = cohort_images().filter(pl.col("shard") == int(wildcards.shard))
    return sorted(rows["path"].to_list())


def shard_digest(wildcards):
    """Digest of the shard's rows, so a changed region or id (same files) also reruns the shard."""
    rows = (
        cohort_images()
        .filter(pl.col("shard") == int(wildcards.shard))
        .sort("image_uid")
    )
    text = json.dumps(rows.select("image_uid", "region", "path").rows())
    return hashlib.sha256(text.encode()).hexdigest()


def shard_files(pattern):
    def files(wildcards):
        return [pattern.format(shard=k) for k in shard_ids()]

    return files
