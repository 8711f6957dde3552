"""A set-vs-rest image classifier per finding of one model and its GradCAM over the set's test images (paper 003,
3.1), with the held-out balanced accuracy; resumes after a preemption."""

import sys
from pathlib import Path

from cohortlens.analysis.saliency import write_saliency
from cohortlens.logs import to_rule_log
from cohortlens.models.training.checkpoint import TrainingPreempted

log = to_rule_log(snakemake)
try:
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
except TrainingPreempted as stop:
    log.warning("%s", stop)  # the checkpoint is on disk; a retry resumes from it
    sys.exit(stop.exit_code)
log.info("%d findings, %d weak", index.height, int(index["weak"].sum()))
