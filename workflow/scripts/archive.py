# The archive rule, one job per kind (wildcard `kind`): publication (aggregates only, release-checked) or internal
# (the full report, the publication report and the tables of cohortlens.report.archive.DEFAULT_MEMBERS; optional
# input `tables`: files or folders instead). Output archive and checksums, params config.
from cohortlens.logs import to_rule_log
from cohortlens.report.archive import default_files, write_archive
from cohortlens.report.publish import write_publication_archive

log = to_rule_log(snakemake)
inputs = snakemake.input
if snakemake.wildcards.kind == "publication":
    summary = write_publication_archive(
        snakemake.output.archive,
        results_dir="results",
        report=inputs.report,
        maps_dir=inputs.maps,
        config=snakemake.params.config,
        sums_path=snakemake.output.checksums,
    )
else:
    tables = list(getattr(inputs, "tables", None) or []) or default_files("results")
    summary = write_archive(
        snakemake.output.archive,
        report=inputs.report,
        files=[*tables, inputs.publication],
        config=snakemake.params.config,
        images_parquet=inputs.images,
        sums_path=snakemake.output.checksums,
        root="cohortlens-internal",
    )
log.info("archive %s: %s", snakemake.wildcards.kind, summary)
