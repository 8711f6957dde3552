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
        pca=config["models"]["pca"],
    script:
        "../scripts/train_pca.py"
