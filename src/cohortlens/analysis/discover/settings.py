"""The settings of the discover stage (the config `discover:` section): every detector declares its own in a
small frozen dataclass beside its code, and `DEFAULTS` merges them into the one flat mapping the stage and every
detector read (`cfg["alpha"]`, `cfg["permutations"]`, ...).

| class | module | settings |
| --- | --- | --- |
| `CoreSettings` | `core` | FDR level, seed, threads, region size cap, PCA dims, folds, permutations, rare values |
| `LeakSettings` | `leaks` | within-site date leaks, onset bootstraps |
| `ClusterSettings` | `clusters` | HDBSCAN, stability, neighbourhood pockets, enrichment, site×date |
| `SubgroupSettings` | `subgroups` | the discordant subgroup's folds |
| `DriftSettings` | `drift` | permutations of the drift-along-the-date test |
| `ExplainSettings` | `explain` | the explanation PNGs |

The config check reads the same classes from source (`workflow/schemas/config.schema.yaml`, `x-settings` of
`discover`): a new setting is one field in one of them. A name may be declared by one class only.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from cohortlens.analysis.discover.clusters import ClusterSettings
from cohortlens.analysis.discover.core import CoreSettings
from cohortlens.analysis.discover.drift import DriftSettings
from cohortlens.analysis.discover.explain import ExplainSettings
from cohortlens.analysis.discover.leaks import LeakSettings
from cohortlens.analysis.discover.subgroups import SubgroupSettings

SETTINGS_CLASSES = (CoreSettings, LeakSettings, ClusterSettings, SubgroupSettings, DriftSettings, ExplainSettings)


def _merged(classes) -> dict:
    out: dict = {}
    for cls in classes:
        for key, value in dataclasses.asdict(cls()).items():
            if key in out:
                raise TypeError(f"discover setting {key!r} is declared twice ({cls.__name__})")
            out[key] = value
    return out


DEFAULTS: dict = _merged(SETTINGS_CLASSES)
"""Every discover setting and its default."""


def settings(cfg: Mapping | None) -> dict:
    """DEFAULTS updated by the config `discover:` mapping; an unknown key is an error."""
    out = dict(DEFAULTS)
    for key, value in (cfg or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown discover setting {key!r}; known: {sorted(DEFAULTS)}")
        out[key] = value
    return out
