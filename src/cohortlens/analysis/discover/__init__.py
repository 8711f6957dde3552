"""The discover stage: tests of one model's embeddings for bias and data-quality problems, as findings.

One module per concept; the stage driver is `stage.discover` (workflow/scripts/discover.py):

| module | what |
| --- | --- |
| `stage` | the driver: load regions, run every detector, correct, find root causes, write the findings |
| `settings` | `DEFAULTS` and `settings()`: the detectors' settings classes merged (the config `discover:` keys) |
| `core` | the `Finding` record and file schema, `RegionData`, BH correction, ids, date and stratum helpers |
| `leaks` | attribute leaks: ridge probes + permutation tests, site×date leaks with their onset |
| `clusters` | HDBSCAN density clusters and kNN neighbourhood pockets, enrichment, site×date |
| `subgroups` | the discordant subgroup detector (findings, paper 003's co-occurrence comparison) |
| `subgroup_null` | its statistics: per-region evidence, the null fitted to the cohort, per-subject p-values |
| `quality` | cleanlab Datalab: label issues, outliers, near duplicates, non-iid |
| `causes` | root causes: conditional re-tests that mark echoes (`explained_by`) |
| `onset` | the change point of a date effect |
| `explain` | one explanation PNG per finding (mean slices, difference, edge profiles) |

Matching findings against a synthetic cohort's ground truth is `cohortlens.demo.truth` (above this layer).
"""
