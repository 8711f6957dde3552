
from cohortlens.logs import to_rule_log
from cohortlens.models.pca import fit_pca_from_files

log = to_rule_log(snakemake)
cfg = snakemake.params.pca
model = fit_pca_from_files(
    snakemake.input.index,
    snakemake.input.splits,
    cfg,
    model_path=snakemake.output.model,
    log_csv=snakemake.output.log_csv,
    reconstructions=snakemake.output.reconstructions,
)
log.info("pca: %d components, explained variance %.3f", model.dim, model.ipca.explained_variance_ratio_.sum())
