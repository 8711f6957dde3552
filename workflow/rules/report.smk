# Stage 10: the self-contained report page (full and publication versions), and the archives of a run
# (`make archive`: publication; `make archive KIND=internal`: everything).
REPORT_INPUTS = dict(
    subjects="results/cohort/subjects.parquet",
    images="results/cohort/images.parquet",
    splits="results/cohort/splits.parquet",
    quarantine="results/cohort/quarantine.parquet",
    # no preprocessed slices, training or slice embeddings without a model that reads images
    index=if_images("results/preprocessed/index.parquet"),
    preprocess_quarantine=if_images("results/preprocessed/quarantine.parquet"),
    embeddings=expand(
        "results/embeddings/{model}/{level}.parquet",
        model=IMAGE_MODELS,
        level=["slices", "volumes"],
    )
    + expand("results/embeddings/{model}/volumes.parquet", model=IMPORTED),
    embedding_quarantine=expand(
        "results/embeddings/{model}/quarantine.parquet", model=IMPORTED
    ),
    reconstructions=expand(
        "results/models/{model}/reconstructions.png", model=IMAGE_MODELS
    ),
    train_logs=expand("results/models/{model}/train_log.csv", model=IMAGE_MODELS),
    projections=expand(
        "results/projections/{model}/{region}/{method}.parquet",
        model=MODELS,
        region=MAP_REGIONS,
        method=PROJECT.get("methods", ["tsne", "umap"]),
    ),
    plots=expand(
        "results/plots/{model}/{region}/{method}",
        model=MODELS,
        region=MAP_REGIONS,
        method=PROJECT.get("methods", ["tsne", "umap"]),
    ),
    metrics=expand("results/probes/{model}/metrics.parquet", model=MODELS),
    predictions=expand("results/probes/{model}/predictions.parquet", model=MODELS),
    baseline_metrics=expand("results/baselines/{arch}/metrics.parquet", arch=BASELINES),
    fairness_groups=expand("results/fairness/{model}/groups.parquet", model=MODELS),
    fairness_summary=expand("results/fairness/{model}/summary.parquet", model=MODELS),
    findings=expand("results/findings/{model}.parquet", model=MODELS),
    finding_tests=expand("results/findings/{model}-tests.parquet", model=MODELS),
    finding_dirs=expand("results/findings/{model}/explain", model=MODELS),
    finding_curves=expand(
        "results/findings/{model}/discordant-training-curves.csv",
        model=FINDING_NETWORK_MODELS,
    ),
    saliency=expand(
        "results/findings/{model}/saliency.parquet", model=FINDING_NETWORK_MODELS
    ),
    reprobe=expand(
        "results/mitigation/{model}/reprobe.parquet", model=MITIGATED_MODELS
    ),
    ground_truth=ground_truth(),
)


rule report:
    input:
        **REPORT_INPUTS,
        # the DAE's counterfactual strips show individual images: the full report only, not the publication one
        counterfactuals=expand(
            "results/counterfactuals/{model}.parquet", model=COUNTERFACTUAL_MODELS
        ),
        counterfactual_dirs=expand(
            "results/counterfactuals/{model}", model=COUNTERFACTUAL_MODELS
        ),
    output:
        html="results/report/index.html",
    log:
        "results/logs/report.log",
    conda:
        ENV
    resources:
        mem_mb=res("report", "mem_mb", 4000),
        runtime=res("report", "runtime", 20),
    params:
        report=config.get("report", {}),
        attributes=config["attributes"],
    script:
        "../scripts/report.py"


# The page that may leave the institution: aggregates only, maps as images with coarsened attributes.
rule publication_report:
    input:
        **REPORT_INPUTS,
    output:
        html="results/report/publication.html",
        maps=directory("results/report/publication-maps"),
    log:
        "results/logs/publication_report.log",
    conda:
        ENV
    resources:
        mem_mb=res("publication_report", "mem_mb", 4000),
        runtime=res("publication_report", "runtime", 20),
    params:
        report=config.get("report", {}),
        attributes=config["attributes"],
    script:
        "../scripts/publication_report.py"


# Not part of `all`: a run is archived on purpose, once its report is final. Two kinds, each its own file:
# publication (aggregates only, release-checked) and internal (everything, for the lab's own storage).
rule archive:
    input:
        unpack(archive_inputs),
    output:
        archive="results/archive/cohortlens-{kind}.tar.gz",
        checksums="results/archive/cohortlens-{kind}.SHA256SUMS",
    log:
        "results/logs/archive-{kind}.log",
    wildcard_constraints:
        kind="publication|internal",
    conda:
        ENV
    resources:
        mem_mb=res("archive", "mem_mb", 4000),
        runtime=res("archive", "runtime", 30),
    params:
        config=config,
    script:
        "../scripts/archive.py"
