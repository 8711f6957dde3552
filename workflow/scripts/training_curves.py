"""The discordant subgroup's training curves of one model (paper 003, Fig. 3): a classifier of the recorded value,
its accuracy per epoch for the flagged subjects and the rest, on train and val; resumes after a preemption."""

from pathlib import Path

from cohortlens.analysis.subgroup_curves import write_subgroup_curves
from cohortlens.logs import to_rule_log
from cohortlens.models.training.checkpoint import exit_on_preemption

log = to_rule_log(snakemake)
with exit_on_preemption(log):  # a retry resumes from the checkpoint
    curves = write_subgroup_curves(
        snakemake.input.findings,
        snakemake.input.index,
        snakemake.input.subjects,
        snakemake.input.splits,
        images=snakemake.input.images,
        attributes=snakemake.params.attributes,
        cfg=snakemake.params.cfg,
        csv_out=snakemake.output.csv,
        png_out=snakemake.output.png,
        out_dir=Path(snakemake.output.csv).parent,
        model=snakemake.params.model,
        threads=snakemake.threads,
    )
log.info("%d curve rows", curves.height)
