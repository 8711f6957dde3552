"""Mitigated embeddings of one model (in the embedding contract) and the re-probe table."""

from cohortlens.analysis.mitigate import run_mitigation
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
cfg = dict(snakemake.params.mitigate)
table = run_mitigation(
    snakemake.input.volumes,
    snakemake.input.subjects,
    snakemake.input.splits,
    snakemake.output.embeddings,
    snakemake.output.reprobe,
    protected=cfg.get("protected", ["sex"]),
    targets=cfg.get("targets", []),
    methods=cfg.get("methods", ["leace", "inlp", "avae"]),
    images=snakemake.input.images,
    attributes=snakemake.params.attributes,
    inlp=cfg.get("inlp"),
    avae=cfg.get("avae"),
    threads=snakemake.threads,
    seed=cfg.get("seed", 0),
)
log.info("%d re-probe rows", table.height)
