# Stage 9: remove protected attributes from the embeddings (LEACE, INLP, adversarial VAE) and re-probe.
rule mitigate:
    input:
        volumes="results/embeddings/{model}/volumes.parquet",
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
    output:
        reprobe="results/mitigation/{model}/reprobe.parquet",
        embeddings=directory("results/mitigation/{model}/embeddings"),
    log:
        "results/logs/mitigate/{model}.log",
    conda:
        ENV
    threads: res("mitigate", "threads", 2)
    resources:
        mem_mb=res("mitigate", "mem_mb", 8000),
        runtime=res("mitigate", "runtime", 120),
    params:
        attributes=config["attributes"],
        mitigate={k: v for k, v in MITIGATE.items() if k != "models"},
    script:
        "../scripts/mitigate.py"
