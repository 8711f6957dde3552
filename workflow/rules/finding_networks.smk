# Networks trained on the images after discover, one job each per model (config `finding_networks:`; absent: no
# jobs): the discordant subgroup's training curves (paper 003, Fig. 3) and a set-vs-rest classifier with GradCAM per
# finding (paper 003, 3.1). GPU jobs on a cluster (resources `training_curves` / `saliency`); both resume from their
# checkpoints in results/findings/{model}/checkpoints/ and load finished networks instead of training them again.
FINDING_NETWORKS = config.get("finding_networks")
FINDING_NETWORK_MODELS = (
    [m for m in FINDING_NETWORKS.get("models", MODELS) if m in MODELS]
    if FINDING_NETWORKS is not None
    else []
)
FINDING_NETWORK_INPUTS = dict(
    findings="results/findings/{model}.parquet",
    index="results/preprocessed/index.parquet",
    subjects="results/cohort/subjects.parquet",
    images="results/cohort/images.parquet",
    splits="results/cohort/splits.parquet",
    shards=shard_files("results/preprocessed/shard-{shard}.npy"),
)


rule training_curves:
    input:
        **FINDING_NETWORK_INPUTS,
    output:
        csv="results/findings/{model}/discordant-training-curves.csv",
        png="results/findings/{model}/discordant-training-curves.png",
    log:
        "results/logs/training_curves/{model}.log",
    wildcard_constraints:
        model=one_of(FINDING_NETWORK_MODELS),
    conda:
        ENV_GPU
    threads: res("training_curves", "threads", 1)
    resources:
        gpu=res("training_curves", "gpu", 1),
        cpus_per_gpu=res("training_curves", "cpus_per_gpu", 4),
        mem_mb=res("training_curves", "mem_mb", 8000),
        runtime=res("training_curves", "runtime", 240),
    params:
        model="{model}",
        cfg=FINDING_NETWORKS,
        attributes=config["attributes"],
    script:
        "../scripts/training_curves.py"


rule saliency:
    input:
        **FINDING_NETWORK_INPUTS,
    output:
        pngs=directory("results/findings/{model}/saliency"),
        index="results/findings/{model}/saliency.parquet",
    log:
        "results/logs/saliency/{model}.log",
    wildcard_constraints:
        model=one_of(FINDING_NETWORK_MODELS),
    conda:
        ENV_GPU
    threads: res("saliency", "threads", 1)
    resources:
        gpu=res("saliency", "gpu", 1),
        cpus_per_gpu=res("saliency", "cpus_per_gpu", 4),
        mem_mb=res("saliency", "mem_mb", 8000),
        runtime=res("saliency", "runtime", 240),
    params:
        cfg=FINDING_NETWORKS,
        attributes=config["attributes"],
    script:
        "../scripts/saliency.py"
