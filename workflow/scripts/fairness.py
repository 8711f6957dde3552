"""Fairness of one model's target predictions: groups.parquet (per group) and summary.parquet (gaps)."""

from cohortlens.analysis.fairness import run_fairness
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
summary = run_fairness(
    snakemake.input.predictions,
    snakemake.input.subjects,
    snakemake.output.groups,
    snakemake.output.summary,
    images=snakemake.input.images,
    attributes=snakemake.params.attributes,
    settings=snakemake.params.fairness,
    threads=snakemake.threads,
)
log.info("%d fairness rows", summary.height)
