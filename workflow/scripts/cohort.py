from cohortlens.cohort.build import build_cohort
from cohortlens.cohort.shards import write_shard_lists
from cohortlens.io.tables import write_parquet
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
p = snakemake.params
tables = build_cohort(
    snakemake.input.manifest,
    attributes=p.attributes,
    regions=p.regions,
    split=p.split,
    subjects_per_shard=p.subjects_per_shard,
    image_root=p.image_root,
    manifest_schema=snakemake.input.schema,
)
meta = {"manifest_rows": tables.n_manifest_rows, "attributes": p.attributes}
write_parquet(tables.subjects, snakemake.output.subjects, meta)
write_parquet(tables.images, snakemake.output.images, meta)
write_parquet(tables.splits, snakemake.output.splits, meta)
write_parquet(tables.quarantine, snakemake.output.quarantine, meta)
lists = write_shard_lists(tables.images, snakemake.output.shards)
log.info(
    "%d manifest rows -> %d images of %d subjects, %d quarantined; shard lists: %d written, %d unchanged, %d removed",
    tables.n_manifest_rows, tables.images.height, tables.subjects.height, tables.quarantine.height,
    len(lists["written"]), len(lists["kept"]), len(lists["removed"]),
)
