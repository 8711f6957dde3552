# Stage 1: manifest + attribute config -> subjects, images (with shard), splits, quarantine, shard lists.
# A checkpoint: the shard lists it writes decide the preprocess jobs.
checkpoint cohort:
    input:
        manifest=config["cohort"]["manifest"],
        schema=os.path.join(workflow.basedir, "workflow/schemas/manifest.schema.yaml"),
    output:
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
        quarantine="results/cohort/quarantine.parquet",
        # one file list per shard, rewritten only when the shard's rows change (kept, not deleted, before the job)
        shards=update(directory("results/cohort/shards")),
    log:
        "results/logs/cohort.log",
    conda:
        ENV
    resources:
        mem_mb=res("cohort", "mem_mb", 4000),
        runtime=res("cohort", "runtime", 30),
    params:
        attributes=config["attributes"],
        regions=sorted(config["regions"]),
        split=config["cohort"].get("split", {}),
        image_root=config["cohort"].get("image_root"),
        subjects_per_shard=config["preprocess"].get("subjects_per_shard", 64),
    script:
        "../scripts/cohort.py"
