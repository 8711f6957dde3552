"""Probes of every attribute in every region of one model: metrics.parquet and predictions.parquet."""

from cohortlens.analysis.probe import write_probes
from cohortlens.logs import to_rule_log
from cohortlens.runtime import limit_threads

log = to_rule_log(snakemake)
with limit_threads(snakemake.threads):
    metrics = write_probes(
        snakemake.input.volumes,
        snakemake.input.subjects,
        snakemake.input.splits,
        snakemake.output.metrics,
        snakemake.output.predictions,
        images=snakemake.input.images,
        attributes=snakemake.params.attributes,
        settings=snakemake.params.probe,
    )
log.info("%d metric rows", metrics.height)
