# Stage 10 (so far): the self-contained report page listing what the run produced.
rule report:
    input:
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
        quarantine="results/cohort/quarantine.parquet",
        index="results/preprocessed/index.parquet",
        preprocess_quarantine="results/preprocessed/quarantine.parquet",
        embeddings=expand(
            "results/embeddings/{model}/{level}.parquet",
            model=MODELS,
            level=["slices", "volumes"],
        ),
        reconstructions=expand(
            "results/models/{model}/reconstructions.png", model=MODELS
        ),
    output:
        html="results/report/index.html",
    log:
        "results/logs/report.log",
    conda:
        ENV
    resources:
        mem_mb=res("report", "mem_mb", 2000),
        runtime=res("report", "runtime", 10),
    params:
        report=config.get("report", {}),
    script:
        "../scripts/report.py"
