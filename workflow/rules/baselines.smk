# Supervised baselines (paper 003, Table 1): ResNet10 / ResNet34 / DenseNet121 trained on the images per attribute
# with the probes' splits and balancing, one job per architecture (a GPU job on a cluster: resources from config
# `resources: baseline_<arch>`), resumed from its checkpoints when restarted after a preemption.
rule train_baseline:
    input:
        index="results/preprocessed/index.parquet",
        subjects="results/cohort/subjects.parquet",
        images="results/cohort/images.parquet",
        splits="results/cohort/splits.parquet",
        shards=shard_files("results/preprocessed/shard-{shard}.npy"),
    output:
        metrics="results/baselines/{arch}/metrics.parquet",
        predictions="results/baselines/{arch}/predictions.parquet",
        log_csv="results/baselines/{arch}/train_log.csv",
    log:
        "results/logs/baselines/{arch}.log",
    wildcard_constraints:
        arch=one_of(BASELINES),
    conda:
        ENV_GPU
    threads: arch_res("baseline", "threads", 2)
    resources:
        gpu=arch_res("baseline", "gpu", 1),
        cpus_per_gpu=arch_res("baseline", "cpus_per_gpu", 4),
        mem_mb=arch_res("baseline", "mem_mb", 16000),
        runtime=arch_res("baseline", "runtime", 720),
    params:
        arch="{arch}",
        cfg=lambda wildcards: config["baselines"][wildcards.arch],
        attributes=config["attributes"],
        probe=probe_fit_settings(),
    script:
        "../scripts/train_baseline.py"
