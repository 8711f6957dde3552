"""Embed every slice and volume with a trained autoencoder (EMA weights when present)."""

from cohortlens.embed.autoencoder import embed_autoencoder
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
cfg = snakemake.params.cfg
summary = embed_autoencoder(
    snakemake.input.model,
    snakemake.input.index,
    slices_path=snakemake.output.slices,
    volumes_path=snakemake.output.volumes,
    splits_path=snakemake.input.splits,
    normalise=cfg.get("normalise"),
    batch_size=int(cfg.get("embed_batch_size", 256)),
    device=cfg.get("device", "auto"),
    threads=snakemake.threads,
)
log.info("%s embeddings: %s", snakemake.params.model, summary)
