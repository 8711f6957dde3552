"""Supervised baseline of one architecture (resnet10 | resnet34 | densenet121) on every attribute: trained on the
images, scored like the probes; resumes from its checkpoints after a preemption."""

from cohortlens.analysis.baselines import write_baselines
from cohortlens.logs import to_rule_log
from cohortlens.models.training.checkpoint import exit_on_preemption

log = to_rule_log(snakemake)
with exit_on_preemption(log):  # a retry resumes from the checkpoint
    metrics = write_baselines(
        snakemake.params.arch,
        snakemake.params.cfg,
        snakemake.input.index,
        snakemake.input.subjects,
        snakemake.input.splits,
        images=snakemake.input.images,
        attributes=snakemake.params.attributes,
        probe=snakemake.params.probe,
        metrics_out=snakemake.output.metrics,
        predictions_out=snakemake.output.predictions,
        log_csv=snakemake.output.log_csv,
        threads=snakemake.threads,
    )
log.info("%d metric rows", metrics.height)
