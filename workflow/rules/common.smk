# Helpers shared by the rules: shard lists come from the cohort checkpoint, so the DAG has one job per
# shard (not per image) and grows with the cohort only through the shard count.
import functools
import hashlib
import json
import os

import polars as pl

MODELS = list(config["models"])
ENV = "../../envs/cohortlens.yaml"  # CPU stages
ENV_GPU = "../../envs/cohortlens-gpu.yaml"  # training and embedding (torch + the cuml-cu13 extra)


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


# Autoencoders: every configured model but the pca baseline (its own rules) and external embeddings.
AUTOENCODERS = [m for m in MODELS if m != "pca"]


def one_of(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(map(str, names)) if names else "(?!)"


def model_res(stage, key, default):
    """A resource of the `stage` job of one model, from config resources `<stage>_<model>`."""
    return lambda wildcards: res(f"{stage}_{wildcards.model}", key, default)


REGIONS = list(config["regions"])
# projections per region and of all regions together (paper 003, Fig. 1: region clusters)
MAP_REGIONS = REGIONS + ["all"]
PROJECT = config.get("project", {})
MITIGATE = config.get("mitigate", {})
MITIGATED_MODELS = [m for m in MITIGATE.get("models", MODELS) if m in MODELS]


def ground_truth():
    """The demo cohort's planted effects (the report shows recall against them); none for a real cohort."""
    if "demo" not in config:
        return []
    return [os.path.join(config["demo"]["out_dir"], "ground_truth.json")]


def archive_inputs(wildcards):
    """publication: the publication report and its maps (the tables are read from results/); internal: both
    reports."""
    common = {
        "subjects": "results/cohort/subjects.parquet",
        "images": "results/cohort/images.parquet",
        "splits": "results/cohort/splits.parquet",
        "quarantine": "results/cohort/quarantine.parquet",
        "preprocess_quarantine": "results/preprocessed/quarantine.parquet",
    }
    if wildcards.kind == "publication":
        return {
            **common,
            "report": "results/report/publication.html",
            "maps": "results/report/publication-maps",
        }
    return {
        **common,
        "report": "results/report/index.html",
        "publication": "results/report/publication.html",
    }
