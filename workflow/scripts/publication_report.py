# The publication report: the report page without participant-level data (docs/report.md), and its maps as PNGs.
from cohortlens.logs import to_rule_log
from cohortlens.report.html import build_report_from_inputs

log = to_rule_log(snakemake)
summary = build_report_from_inputs(
    snakemake.input,
    snakemake.params.report,
    snakemake.output.html,
    publication=True,
    maps_dir=snakemake.output.maps,
    attributes=snakemake.params.attributes,
)
log.info("publication report: %s", summary)
