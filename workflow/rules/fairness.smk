# Stage 7: per-subgroup metrics of the probes' target predictions over protected groups (fairlearn).
rule fairness:
    input:
        predictions="results/probes/{model}/predictions.parquet",
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
    output:
        groups="results/fairness/{model}/groups.parquet",
        summary="results/fairness/{model}/summary.parquet",
    log:
        "results/logs/fairness/{model}.log",
    conda:
        ENV
    resources:
        mem_mb=res("fairness", "mem_mb", 4000),
        runtime=res("fairness", "runtime", 30),
    params:
        attributes=config["attributes"],
        fairness=config.get("fairness", {}),
    script:
        "../scripts/fairness.py"
