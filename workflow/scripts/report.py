from pathlib import Path

from cohortlens.logs import to_rule_log
from cohortlens.report.html import build_report

log = to_rule_log(snakemake)
cfg = snakemake.params.report
embeddings = {}
for path in snakemake.input.embeddings:
    model, level = Path(path).parent.name, Path(path).stem
    embeddings.setdefault(model, {})[level] = path
for png in snakemake.input.reconstructions:
    embeddings[Path(png).parent.name]["reconstructions"] = png
counts = build_report(
    title=cfg.get("title", "cohortlens report"),
    cohort_dir=Path(snakemake.input.subjects).parent,
    preprocessed_dir=Path(snakemake.input.index).parent,
    embeddings=embeddings,
    out_path=snakemake.output.html,
    max_quarantine_rows=cfg.get("max_quarantine_rows", 50),
)
log.info("report: %s", counts)
