# Stage 6: SVM probes per model, region and attribute (balanced training, tuned on val, bootstrap CIs on test).
rule probe:
    input:
        volumes="results/embeddings/{model}/volumes.parquet",
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
    output:
        metrics="results/probes/{model}/metrics.parquet",
        predictions="results/probes/{model}/predictions.parquet",
    log:
        "results/logs/probe/{model}.log",
    conda:
        ENV
    threads: res("probe", "threads", 2)
    resources:
        gpu=res("probe", "gpu", 0),
        mem_mb=res("probe", "mem_mb", 8000),
        runtime=res("probe", "runtime", 120),
    params:
        attributes=config["attributes"],
        probe=config.get("probe", {}),
    script:
        "../scripts/probe.py"
