from cohortlens.cohort.build import QUARANTINE_SCHEMA
from cohortlens.io.tables import write_parquet
from cohortlens.logs import to_rule_log
from cohortlens.preprocess.shard import INDEX_SCHEMA, merge_shard_tables

log = to_rule_log(snakemake)
index = merge_shard_tables(list(snakemake.input.index), INDEX_SCHEMA)
quarantine = merge_shard_tables(list(snakemake.input.quarantine), QUARANTINE_SCHEMA)
write_parquet(index, snakemake.output.index)
write_parquet(quarantine, snakemake.output.quarantine)
log.info("%d slices, %d images quarantined in preprocessing", index.height, quarantine.height)
