# Stage 8: findings (attribute leaks, clusters, discordant subgroups, cleanlab data issues) per model. The
# explanation PNGs go to results/findings/{model}/explain/: the folder results/findings/{model}/ also holds the
# outputs of the finding networks (finding_networks.smk), which cannot sit inside another job's directory output.
rule discover:
    input:
        volumes="results/embeddings/{model}/volumes.parquet",
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
        # the explanation images' slices: none in an embeddings-only cohort (explanations skipped, with a note)
        index=if_images("results/preprocessed/index.parquet"),
        shards=if_images(shard_files("results/preprocessed/shard-{shard}.npy")),
    output:
        findings="results/findings/{model}.parquet",
        tests="results/findings/{model}-tests.parquet",
        evidence=directory("results/findings/{model}/explain"),
    log:
        "results/logs/discover/{model}.log",
    wildcard_constraints:
        model="[^/]+",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=res("discover", "mem_mb", 4000),
        runtime=res("discover", "runtime", 60),
    params:
        attributes=config["attributes"],
        discover=config.get("discover", {}),
    script:
        "../scripts/discover.py"
