# cohortlens: imaging cohort -> embeddings -> bias and data-quality report.
# Stages are one .smk each under workflow/rules/, in DAG order; logic lives in src/cohortlens/.
import os

from snakemake.utils import min_version, validate

from cohortlens.config import check_config

min_version("9.0")

# torch's OpenMP threads spin while they wait for work; where the cores are shared (a laptop, CI, two jobs on one
# node) the spinning threads take the cores the working ones need: under load a demo baseline job took 248 s
# instead of 43 s, with identical results (docs/benchmarks.md). Every job inherits this; a user's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The demo config is the default; a cohort's own --configfile replaces it instead of being merged into
# it, so demo attributes and regions never leak into a real cohort's config.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Every mistake at once, each naming its key, before any job; Snakemake's validate (which stops at the first)
# then fills in the schema's defaults.
check_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/project.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/fairness.smk"
include: "workflow/rules/discover.smk"
include: "workflow/rules/counterfactuals.smk"
include: "workflow/rules/finding_networks.smk"
include: "workflow/rules/mitigate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "results/report/index.html",
        "results/report/publication.html",
