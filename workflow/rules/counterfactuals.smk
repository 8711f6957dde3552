# Stage 8b: counterfactual strips of the DAE's findings (each finding's direction in z_sem, test images decoded
# from their own DDIM code along it). Planned only when the config has a dae model.
rule counterfactuals:
    input:
        model="results/models/{model}/model.pt",
        slices="results/embeddings/{model}/slices.parquet",
        findings="results/findings/{model}.parquet",
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
        index="results/preprocessed/index.parquet",
        shards=shard_files("results/preprocessed/shard-{shard}.npy"),
    output:
        index="results/counterfactuals/{model}.parquet",
        strips=directory("results/counterfactuals/{model}"),
    log:
        "results/logs/counterfactuals/{model}.log",
    wildcard_constraints:
        model=one_of(COUNTERFACTUAL_MODELS),
    conda:
        ENV_GPU
    threads: res("counterfactuals", "threads", 1)
    resources:
        gpu=res("counterfactuals", "gpu", 0),
        mem_mb=res("counterfactuals", "mem_mb", 4000),
        runtime=res("counterfactuals", "runtime", 60),
    params:
        attributes=config["attributes"],
        counterfactuals=config.get("counterfactuals", {}),
    script:
        "../scripts/counterfactuals.py"
