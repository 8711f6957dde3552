"""Counterfactual strips of one DAE's findings: decodes along each finding's direction in z_sem."""

from cohortlens.analysis.counterfactuals import counterfactuals
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
index = counterfactuals(
    snakemake.input.model,
    snakemake.input.slices,
    snakemake.input.index,
    snakemake.input.findings,
    snakemake.input.subjects,
    snakemake.input.images,
    snakemake.input.splits,
    snakemake.params.attributes,
    snakemake.params.counterfactuals,
    snakemake.output.strips,
    snakemake.output.index,
    threads=snakemake.threads,
)
log.info("%d counterfactual strips: %s", index.height, index["finding_id"].to_list())
