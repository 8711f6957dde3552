from cohortlens.logs import to_rule_log
from cohortlens.report.archive import write_archive

log = to_rule_log(snakemake)
summary = write_archive(
    snakemake.output.archive,
    report=snakemake.input.report,
    files=list(snakemake.input.tables),
    config=snakemake.params.config,
    images_parquet=snakemake.input.images,
    sums_path=snakemake.output.sums,
)
log.info("archive: %s", summary)
