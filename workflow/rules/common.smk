# Helpers shared by the rules: shard lists come from the cohort checkpoint, so the DAG has one job per
# shard (not per image) and grows with the cohort only through the shard count.
import functools
import os

import polars as pl

from cohortlens.cohort.shards import files_stamp, read_shard_list, shard_list_path

MODELS = list(config["models"])
ENV = "../../envs/cohortlens.yaml"  # CPU stages
ENV_GPU = "../../envs/cohortlens-gpu.yaml"  # training and embedding (torch + the cuml-cu13 extra)


def probe_fit_settings():
    """config `probe:` without the keys of its repeated CV (the baselines train on the fixed split: changing how
    the probes are scored must not retrain them)."""
    return {k: v for k, v in config.get("probe", {}).items() if not k.startswith("cv_")}


def res(rule_name, key, default):
    """A resource for a rule from config['resources'][rule] (cluster users tune them there)."""
    return config.get("resources", {}).get(rule_name, {}).get(key, default)


@functools.cache
def _shard_ids(path, mtime_ns):
    return sorted(pl.read_parquet(path, columns=["shard"])["shard"].unique().to_list())


def shard_ids(wildcards=None):
    path = checkpoints.cohort.get().output.images
    return _shard_ids(path, os.stat(path).st_mtime_ns)


def shard_list(wildcards):
    """The shard's file list, results/cohort/shards/shard-{k}.tsv, rewritten by the checkpoint only when the
    shard's rows change: one new image reruns only its own shard. One input per shard, not one per image
    (223k image inputs cost ~20 s of bookkeeping per dry run: docs/benchmarks.md)."""
    return shard_list_path(checkpoints.cohort.get().output.shards, wildcards.shard)


def shard_files_stamp(wildcards):
    """Digest of the shard's image files' mtime and size (a param): an image edited in place reruns its shard."""
    path = shard_list(wildcards)
    if not os.path.exists(path):
        return "no shard list"  # Snakemake then names the missing input instead of this param failing
    return files_stamp(read_shard_list(path))


def shard_files(pattern):
    def files(wildcards):
        return [pattern.format(shard=k) for k in shard_ids()]

    return files


# Imported models (`embeddings: <file>`, e.g. CT foundation vectors): no preprocess, train or embed job, one
# import_embeddings job each. A cohort whose models are all imported reads no image.
IMPORTED = {m: c for m, c in config["models"].items() if "embeddings" in (c or {})}
IMAGE_MODELS = [m for m in MODELS if m not in IMPORTED]
# Autoencoders: every configured model but the pca baseline (its own rules) and imported embeddings.
AUTOENCODERS = [m for m in IMAGE_MODELS if m != "pca"]
# Counterfactual strips need a DDIM decoder: the dae only.
COUNTERFACTUAL_MODELS = [m for m in AUTOENCODERS if m == "dae"]


def one_of(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(map(str, names)) if names else "(?!)"


def model_res(stage, key, default):
    """A resource of the `stage` job of one model, from config resources `<stage>_<model>`."""
    return lambda wildcards: res(f"{stage}_{wildcards.model}", key, default)


# Supervised baselines (config `baselines:`): one train_baseline job per architecture listed there.
BASELINES = list(config.get("baselines", {}))


def arch_res(stage, key, default):
    """A resource of the `stage` job of one baseline architecture, from config resources `<stage>_<arch>`."""
    return lambda wildcards: res(f"{stage}_{wildcards.arch}", key, default)


REGIONS = list(config["regions"])
# projections per region and of all regions together (paper 003, Fig. 1: region clusters)
MAP_REGIONS = REGIONS + ["all"]
PROJECT = config.get("project", {})
MITIGATE = config.get("mitigate", {})
MITIGATED_MODELS = [m for m in MITIGATE.get("models", MODELS) if m in MODELS]


def if_images(files):
    """An input that exists only when some model reads images (the preprocessed slices); none (an empty list, so
    the input's name is still there) in an embeddings-only cohort."""
    return files if IMAGE_MODELS else []


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
        "preprocess_quarantine": if_images("results/preprocessed/quarantine.parquet"),
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
