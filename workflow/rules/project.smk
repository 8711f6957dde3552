# Stage 5: 2-D maps of the volume embeddings per model and region (and all regions together). Each method is
# its own rule with only its own config slice, so a changed perplexity reruns only t-SNE and its plots.
rule project_tsne:
    input:
        volumes="results/embeddings/{model}/volumes.parquet",
    output:
        expand(
            "results/projections/{{model}}/{region}/tsne.parquet", region=MAP_REGIONS
        ),
    log:
        "results/logs/project/{model}-tsne.log",
    conda:
        ENV
    threads: res("project", "threads", 2)
    resources:
        gpu=res("project", "gpu", 0),
        mem_mb=res("project", "mem_mb", 8000),
        runtime=res("project", "runtime", 120),
    params:
        method="tsne",
        settings=PROJECT.get("tsne", {}),
    script:
        "../scripts/project.py"


use rule project_tsne as project_umap with:
    output:
        expand(
            "results/projections/{{model}}/{region}/umap.parquet", region=MAP_REGIONS
        ),
    log:
        "results/logs/project/{model}-umap.log",
    params:
        method="umap",
        settings=PROJECT.get("umap", {}),


# Interactive Plotly maps coloured by every attribute (+ static PNG via kaleido) per model, region, method.
rule plot_projection:
    input:
        projections=expand(
            "results/projections/{{model}}/{region}/{{method}}.parquet",
            region=MAP_REGIONS,
        ),
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
    output:
        directory(
            expand("results/plots/{{model}}/{region}/{{method}}", region=MAP_REGIONS)
        ),
    log:
        "results/logs/plot/{model}-{method}.log",
    wildcard_constraints:
        method="tsne|umap",
    conda:
        ENV
    resources:
        mem_mb=res("plot_projection", "mem_mb", 4000),
        runtime=res("plot_projection", "runtime", 30),
    params:
        attributes=config["attributes"],
        plots=PROJECT.get("plots", {}),
    script:
        "../scripts/plot_projection.py"
