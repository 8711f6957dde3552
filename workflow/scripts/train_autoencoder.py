"""Train one autoencoder (vae | dae) on the train split; resumes from its checkpoints after a preemption."""

import sys

from cohortlens.logs import to_rule_log
from cohortlens.models.training.checkpoint import TrainingPreempted
from cohortlens.models.training.stage import train_from_files

log = to_rule_log(snakemake)
name = snakemake.params.model
try:
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
except TrainingPreempted as stop:
    # SLURM preemption / time limit: the checkpoint is on disk; a non-zero exit lets SLURM requeue or
    # Snakemake retry the job, which then resumes from it
    log.warning("%s", stop)
    sys.exit(stop.exit_code)
final = result.log[-1] if result.log else {}
log.info("%s: %d steps (resumed from %s), final loss %s", name, result.steps, result.resumed_from, final.get("loss"))
