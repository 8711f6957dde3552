import polars as pl

from cohortlens.logs import to_rule_log
from cohortlens.preprocess.shard import preprocess_shard

log = to_rule_log(snakemake)
shard = int(snakemake.wildcards.shard)
result = preprocess_shard(
    pl.read_parquet(snakemake.input.images),
    shard,
    regions=snakemake.params.regions,
    preprocess=snakemake.params.preprocess,
    out_slices=snakemake.output.slices,
    out_index=snakemake.output.index,
    out_quarantine=snakemake.output.quarantine,
    threads=snakemake.threads,
)
log.info("shard %d: %s", shard, result)
