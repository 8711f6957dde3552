"""A set-vs-rest image classifier per finding of one model and its GradCAM over the set's test images (paper 003,
3.1), with the held-out balanced accuracy; resumes after a preemption."""

from pathlib import Path

from cohortlens.analysis.saliency import write_saliency
from cohortlens.logs import to_rule_log
from cohortlens.models.training.checkpoint import exit_on_preemption

log = to_rule_log(snakemake)
with exit_on_preemption(log):  # a retry resumes from the checkpoint
    index, _ = write_saliency(
        snakemake.input.findings,
        snakemake.input.index,
        snakemake.input.subjects,
        snakemake.input.splits,
        images=snakemake.input.images,
        attributes=snakemake.params.attributes,
        cfg=snakemake.params.cfg,
        png_dir=snakemake.output.pngs,
        index_out=snakemake.output.index,
        out_dir=Path(snakemake.output.index).parent,
        threads=snakemake.threads,
    )
log.info("%d findings, %d weak", index.height, int(index["weak"].sum()))
