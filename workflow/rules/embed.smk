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
        pca=config["models"]["pca"],
    script:
        "../scripts/embed_pca.py"
