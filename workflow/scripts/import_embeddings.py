# Imported embeddings of one model: checked against the cohort, written in the contract, bad rows quarantined.
from cohortlens.embed.imported import import_embeddings
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
cfg = snakemake.params.cfg
summary = import_embeddings(
    snakemake.input.embeddings,
    snakemake.input.images,
    model=snakemake.params.model,
    volumes_path=snakemake.output.volumes,
    quarantine_path=snakemake.output.quarantine,
    fmt=cfg.get("format"),
    ids=cfg.get("ids"),
    cfg=cfg,
)
log.info("imported embeddings %s: %s", snakemake.params.model, summary)
