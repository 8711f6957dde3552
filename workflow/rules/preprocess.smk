# Stage 2: one job per shard of subjects -> float16 slice shard + its index and quarantine rows.
rule preprocess_shard:
    input:
        images=ancient("results/cohort/images.parquet"),
        files=shard_list,
    output:
        slices="results/preprocessed/shard-{shard}.npy",
        index="results/preprocessed/index-{shard}.parquet",
        quarantine="results/preprocessed/quarantine-{shard}.parquet",
    log:
        "results/logs/preprocess/shard-{shard}.log",
    conda:
        ENV
    threads: config["preprocess"].get("threads", 2)
    resources:
        mem_mb=res("preprocess_shard", "mem_mb", 4000),
        runtime=res("preprocess_shard", "runtime", 60),
    params:
        regions=config["regions"],
        preprocess={
            k: v
            for k, v in config["preprocess"].items()
            if k not in ("subjects_per_shard", "threads")
        },
        files=shard_files_stamp,
    script:
        "../scripts/preprocess_shard.py"


rule preprocess_index:
    input:
        index=shard_files("results/preprocessed/index-{shard}.parquet"),
        quarantine=shard_files("results/preprocessed/quarantine-{shard}.parquet"),
    output:
        index="results/preprocessed/index.parquet",
        quarantine="results/preprocessed/quarantine.parquet",
    log:
        "results/logs/preprocess/index.log",
    conda:
        ENV
    resources:
        mem_mb=res("preprocess_index", "mem_mb", 2000),
        runtime=res("preprocess_index", "runtime", 10),
    script:
        "../scripts/preprocess_index.py"
