"""Train one autoencoder (vae | dae) on the train split; resumes from its checkpoints after a preemption."""

from cohortlens.logs import to_rule_log
from cohortlens.models.training.checkpoint import exit_on_preemption
from cohortlens.models.training.stage import train_from_files

log = to_rule_log(snakemake)
name = snakemake.params.model
with exit_on_preemption(log):  # a retry resumes from the checkpoint
    result = train_from_files(
        name,
        snakemake.params.cfg,
        snakemake.input.index,
        snakemake.input.splits,
        model_path=snakemake.output.model,
        log_csv=snakemake.output.log_csv,
        reconstructions=snakemake.output.reconstructions,
        threads=snakemake.threads,
    )
final = result.log[-1] if result.log else {}
log.info("%s: %d steps (resumed from %s), final loss %s", name, result.steps, result.resumed_from, final.get("loss"))
