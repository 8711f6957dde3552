"""One map method (tsne | umap) for every region of one model's volume embeddings."""

from pathlib import Path

from cohortlens.analysis.project import write_projection
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
settings = dict(snakemake.params.settings)
if snakemake.params.method == "tsne":
    settings.setdefault("n_jobs", snakemake.threads)
for out in snakemake.output:
    region = Path(out).parent.name
    frame = write_projection(snakemake.input.volumes, out, region=region, method=snakemake.params.method, params=settings)
    log.info("%s %s: %d points", snakemake.params.method, region, frame.height)
