# Stage 3: one training job per model. The pca baseline fits on the train split's slices.
rule train_pca:
    input:
        index="results/preprocessed/index.parquet",
        splits="results/cohort/splits.parquet",
        shards=shard_files("results/preprocessed/shard-{shard}.npy"),
    output:
        model="results/models/pca/model.pt",
        log_csv="results/models/pca/train_log.csv",
        reconstructions="results/models/pca/reconstructions.png",
    log:
        "results/logs/train/pca.log",
    conda:
        ENV
    resources:
        mem_mb=res("train_pca", "mem_mb", 4000),
        runtime=res("train_pca", "runtime", 60),
    params:
        pca=config["models"].get("pca", {}),
    script:
        "../scripts/train_pca.py"


# The autoencoders (vae, dae): one job per model, a GPU job on a cluster (resources from config
# `resources: train_<model>`), resumed from its last checkpoint when restarted after a preemption.
rule train_autoencoder:
    input:
        index="results/preprocessed/index.parquet",
        splits="results/cohort/splits.parquet",
        shards=shard_files("results/preprocessed/shard-{shard}.npy"),
    output:
        model="results/models/{model}/model.pt",
        log_csv="results/models/{model}/train_log.csv",
        reconstructions="results/models/{model}/reconstructions.png",
    log:
        "results/logs/train/{model}.log",
    wildcard_constraints:
        model=one_of(AUTOENCODERS),
    conda:
        ENV_GPU
    threads: model_res("train", "threads", 2)
    resources:
        gpu=model_res("train", "gpu", 1),
        cpus_per_gpu=model_res("train", "cpus_per_gpu", 4),
        mem_mb=model_res("train", "mem_mb", 16000),
        runtime=model_res("train", "runtime", 720),
    params:
        model="{model}",
        cfg=lambda wildcards: config["models"][wildcards.model],
    script:
        "../scripts/train_autoencoder.py"
