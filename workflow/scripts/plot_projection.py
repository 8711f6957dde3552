"""Plotly HTML maps (+ static PNG/PDF figures) of one model and method, coloured by each attribute, for every region."""

from pathlib import Path

from cohortlens.analysis.project import write_plots
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
plots = snakemake.params.plots
for projection, out_dir in zip(snakemake.input.projections, snakemake.output):
    assert Path(projection).parent.name == Path(out_dir).parent.name, (projection, out_dir)
    written = write_plots(
        projection,
        snakemake.input.subjects,
        out_dir,
        images=snakemake.input.images,
        attributes=snakemake.params.attributes,
        formats=plots.get("formats", ["png", "pdf"]),
        engine=plots.get("engine", "matplotlib"),
        max_points=plots.get("max_points"),
    )
    log.info("%s: %d files", out_dir, len(written))
