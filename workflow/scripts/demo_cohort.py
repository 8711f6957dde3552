import os
import shutil

from cohortlens.demo.generate import generate_demo_cohort
from cohortlens.logs import to_rule_log

log = to_rule_log(snakemake)
cfg = dict(snakemake.params.demo)
out_dir = cfg.pop("out_dir")
# A changed demo config regenerates from scratch: stale images of a larger cohort must not linger.
for sub in ("images", "dicom"):
    shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
cfg["workers"] = snakemake.threads
summary = generate_demo_cohort(out_dir, **cfg)
log.info("demo cohort: %s", summary)
