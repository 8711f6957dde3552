from cohortlens.embed.pca import embed_pca
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
summary = embed_pca(
    snakemake.input.model,
    snakemake.input.index,
    snakemake.params.pca,
    slices_path=snakemake.output.slices,
    volumes_path=snakemake.output.volumes,
)
log.info("pca embeddings: %s", summary)
