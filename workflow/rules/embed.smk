# Stage 4: embeddings per slice and per (subject, region) volume, in the contract's Parquet schema.
rule embed_pca:
    input:
        model="results/models/pca/model.pt",
        index="results/preprocessed/index.parquet",
        shards=shard_files("results/preprocessed/shard-{shard}.npy"),
    output:
        slices="results/embeddings/pca/slices.parquet",
        volumes="results/embeddings/pca/volumes.parquet",
    log:
        "results/logs/embed/pca.log",
    conda:
        ENV
    resources:
        mem_mb=res("embed_pca", "mem_mb", 4000),
        runtime=res("embed_pca", "runtime", 60),
    params:
        pca=config["models"].get("pca", {}),
    script:
        "../scripts/embed_pca.py"


# Autoencoder embeddings: the EMA encoder's μ / z_sem, streamed over the shards in batches.
rule embed_autoencoder:
    input:
        model="results/models/{model}/model.pt",
        index="results/preprocessed/index.parquet",
        splits="results/cohort/splits.parquet",
        shards=shard_files("results/preprocessed/shard-{shard}.npy"),
    output:
        slices="results/embeddings/{model}/slices.parquet",
        volumes="results/embeddings/{model}/volumes.parquet",
    log:
        "results/logs/embed/{model}.log",
    wildcard_constraints:
        model=one_of(AUTOENCODERS),
    conda:
        ENV_GPU
    threads: model_res("embed", "threads", 2)
    resources:
        gpu=model_res("embed", "gpu", 0),
        mem_mb=model_res("embed", "mem_mb", 8000),
        runtime=model_res("embed", "runtime", 120),
    params:
        model="{model}",
        cfg=lambda wildcards: config["models"][wildcards.model],
    script:
        "../scripts/embed_autoencoder.py"


# Imported embeddings (`models: {<name>: {embeddings: <file>}}`): the file's rows checked against the cohort, the good
# ones written in the contract (volumes only: one vector per subject and region), the others quarantined with reasons.
rule import_embeddings:
    input:
        embeddings=lambda wildcards: IMPORTED[wildcards.model]["embeddings"],
        ids=lambda wildcards: IMPORTED[wildcards.model].get("ids", []),
        images="results/cohort/images.parquet",
    output:
        volumes="results/embeddings/{model}/volumes.parquet",
        quarantine="results/embeddings/{model}/quarantine.parquet",
    log:
        "results/logs/embed/{model}.log",
    wildcard_constraints:
        model=one_of(IMPORTED),
    conda:
        ENV
    resources:
        mem_mb=res("import_embeddings", "mem_mb", 8000),
        runtime=res("import_embeddings", "runtime", 30),
    params:
        model="{model}",
        cfg=lambda wildcards: IMPORTED[wildcards.model],
    script:
        "../scripts/import_embeddings.py"
