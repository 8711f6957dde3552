"""Probes of every attribute in every region of one model: metrics.parquet and predictions.parquet."""

from threadpoolctl import threadpool_limits

from cohortlens.analysis.probe import write_probes
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
with threadpool_limits(limits=snakemake.threads):
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
