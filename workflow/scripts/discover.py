from cohortlens.analysis.discover.stage import discover
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
found = discover(
    snakemake.input.volumes,
    snakemake.input.subjects,
    snakemake.input.images,
    snakemake.input.splits,
    snakemake.params.attributes,
    snakemake.params.discover,
    snakemake.output.findings,
    snakemake.output.evidence,
    index_parquet=snakemake.input.index,
    out_tests=snakemake.output.tests,
)
log.info("%d findings: %s", found.height, found["finding_id"].to_list())
