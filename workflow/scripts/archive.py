# The archive rule: input report (+ images: images.parquet for the identifier scan; optional tables: files or
# folders to archive, default cohortlens.report.archive.DEFAULT_MEMBERS under results/), output archive and
# checksums, params config.
from cohortlens.logs import to_rule_log
from cohortlens.report.archive import default_files, write_archive

log = to_rule_log(snakemake)
tables = list(getattr(snakemake.input, "tables", None) or []) or default_files("results")
summary = write_archive(
    snakemake.output.archive,
    report=snakemake.input.report,
    files=tables,
    config=snakemake.params.config,
    images_parquet=snakemake.input.images,
    sums_path=snakemake.output.checksums,
)
log.info("archive: %s", summary)
