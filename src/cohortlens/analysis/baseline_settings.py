"""The supervised baselines' settings (config `baselines.<arch>`): the protocol keys (`BaselineSettings`), the
engine keys (`cohortlens.models.supervised.settings.SupervisedSettings`) and the presets that set both.

Paper 003 (Table 1) states the architectures (ResNet10, ResNet34, DenseNet121), the targets, the balancing
("equal representation across all predicted value ranges"), a weight decay between 1e-2 and 1e-4 ("can drastically
improve the final prediction") and the fixed field of view of 12 center slices at 256 px. It does not state epochs,
batch size or learning rate: those of `nako` / `chexpert` are chosen here (AdamW, lr 1e-3, cosine schedule,
10 epochs of 1,000 steps; batch 64 at 256 px, CheXpert 128 on 256 px crops of its 320 px canvas with ±16 px shifts).
`demo` runs the three architectures at 1/8 of their channels on the 64 px demo cohort on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from cohortlens.models.supervised.settings import SupervisedSettings

HEADS = ("separate", "shared")


@dataclass(frozen=True)
class BaselineSettings:
    """The baselines protocol; every field has the default used when the key is absent."""

    # AdamW weight decays tried, one network each; the best on the val split is chosen per attribute (paper 003:
    # 0.01 to 0.0001)
    weight_decays: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    # separate: one network per attribute (paper 003); shared: one network per weight decay with a head per
    # attribute (cheaper by the number of attributes; a head's loss sees only its own balancing weights)
    heads: str = "separate"
    attributes: list[str] | None = None  # the attributes to predict; None: every declared one
    region: bool = True  # also classify the region (body region / view) across regions, as the probes do

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "BaselineSettings":
        """The settings from a flat config dict; keys that are not the protocol's are ignored (the engine's)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dict(cfg or {}).items() if k in names}
        if "weight_decays" in kw:
            kw["weight_decays"] = tuple(float(v) for v in kw["weight_decays"])
        s = cls(**kw)
        if s.heads not in HEADS:
            raise ValueError(f"heads must be one of {HEADS}, not {s.heads!r}")
        if not s.weight_decays or min(s.weight_decays) < 0:
            raise ValueError("weight_decays needs at least one value, none negative")
        return s


_PAPER = {"weight_decays": [1e-2, 1e-3, 1e-4], "lr": 1e-3, "lr_schedule": "cosine", "epochs": 10,
          "steps_per_epoch": 1_000, "width": 1.0, "stem_stride": 2, "checkpoint_every": 1_000, "log_every": 50}
_NAKO = {**_PAPER, "crop": 256, "jitter": 0, "batch_size": 64, "warmup_steps": 500, "heads": "separate"}
# 17 attributes (sex, age, projection, the 14 findings): one multi-head network per weight decay
_CHEXPERT = {**_PAPER, "crop": 256, "jitter": 16, "batch_size": 128, "warmup_steps": 500, "heads": "shared"}
# 64 px, 1/8 of the channels, one network per weight decay with a head per attribute (2 CPU cores): 240 / 180 / 120
# steps (ResNet10 / 34 / DenseNet121), the fewest that lift sex above chance in the demo (60 / 45 / 30 left all
# three at chance: docs/findings.md)
_DEMO = {"weight_decays": [1e-2, 1e-3, 1e-4], "heads": "shared", "crop": 64, "jitter": 0, "width": 0.125,
         "stem_stride": 2, "batch_size": 32, "lr": 2e-3, "lr_schedule": "cosine", "warmup_steps": 5, "epochs": 3,
         "steps_per_epoch": 80, "checkpoint_every": 100, "log_every": 10, "predict_batch_size": 256}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "resnet10": {"nako": _NAKO, "chexpert": _CHEXPERT, "demo": _DEMO},
    "resnet34": {"nako": _NAKO, "chexpert": _CHEXPERT, "demo": {**_DEMO, "steps_per_epoch": 60}},
    "densenet121": {"nako": _NAKO, "chexpert": _CHEXPERT, "demo": {**_DEMO, "steps_per_epoch": 40}},
}


def resolve_config(arch: str, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preset named by cfg['preset'] (if any) overridden by every other key of cfg."""
    if arch not in PRESETS:
        raise KeyError(f"unknown architecture {arch!r}; known: {sorted(PRESETS)}")
    cfg = dict(cfg or {})
    preset = cfg.pop("preset", None)
    if preset is None:
        return cfg
    if preset not in PRESETS[arch]:
        raise KeyError(f"baselines.{arch}: unknown preset {preset!r}; available: {sorted(PRESETS[arch])}")
    return {**PRESETS[arch][preset], **cfg}


def baseline_settings(arch: str, cfg: Mapping[str, Any] | None) -> tuple[SupervisedSettings, BaselineSettings]:
    """(engine settings, protocol settings) of one architecture's config entry (preset + overrides)."""
    flat = resolve_config(arch, cfg)
    known = {f.name for cls in (SupervisedSettings, BaselineSettings) for f in dataclasses.fields(cls)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"baselines.{arch}: unknown setting(s) {unknown}")
    return SupervisedSettings.from_config(flat), BaselineSettings.from_config(flat)
