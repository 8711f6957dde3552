from cohortlens.logs import to_rule_log
from cohortlens.report.html import build_report_from_inputs

log = to_rule_log(snakemake)
summary = build_report_from_inputs(
    snakemake.input, snakemake.params.report, snakemake.output.html, attributes=snakemake.params.attributes
)
log.info("report: %s", summary)
