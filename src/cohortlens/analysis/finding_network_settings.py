"""Settings of the networks trained on the images after the discover stage (config `finding_networks:`): the
discordant subgroup's training curves (`curves`: `analysis.subgroup_curves`) and the set-vs-rest classifier with
GradCAM per finding (`saliency`: `analysis.saliency`).

Each subsection holds the engine's keys (`cohortlens.models.supervised.settings.SupervisedSettings`) and its
protocol's (`CurveSettings`, `SaliencySettings`); `preset` (of `PRESETS`) sets both subsections, a key written in a
subsection overrides it there.

Presets. Paper 003 states a ResNet10 sex classifier followed per epoch (Fig. 3: the rest at 96-98 % after one
epoch, the flagged group at 40-70 %) and set-vs-rest classifiers with Grad-CAM (3.1); it does not state epochs,
batch size or learning rate. Chosen here:
- `nako` / `chexpert`: curves 5 epochs of one pass over the training slices each (the paper's "after one epoch"),
  AdamW lr 1e-3, constant after 200 warm-up steps (a cosine decay would shape the later epochs), batch 64, 256 px,
  ResNet10 as published; at most 5,000 images per (split, group) scored after every epoch. Saliency: ResNet10 at
  256 px (stem stride 2: an 8 x 8 GradCAM grid), 3 epochs of 500 steps, batch 64, the 20 largest findings, at most
  5,000 rest images per split.
- `demo` (2 CPU cores, 64 px): curves at 1/8 of the channels, 4 epochs of one pass each (~270 steps); saliency at
  1/8 of the channels with stem stride 1 (a 4 x 4 GradCAM grid instead of 2 x 2), 3 x 30 steps, 6 findings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from cohortlens.models.supervised.networks import ARCHITECTURES
from cohortlens.models.supervised.settings import SupervisedSettings

PARTS = ("curves", "saliency")
SALIENCY_KINDS = ("cluster", "discordant_subgroup")


@dataclass(frozen=True)
class CurveSettings:
    """The training-curves protocol; every field has the default used when the key is absent."""

    arch: str = "resnet10"  # paper 003: a ResNet10 classifier of the recorded value (sex)
    # images per (split, group) scored after every epoch; a seeded sample beyond it (None: every image)
    max_eval_images: int | None = 5000

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "CurveSettings":
        s = cls(**_own(cls, cfg))
        _check_arch(s.arch)
        if s.max_eval_images is not None and s.max_eval_images < 1:
            raise ValueError("max_eval_images must be >= 1 (or null: every image)")
        return s


@dataclass(frozen=True)
class SaliencySettings:
    """The set-vs-rest classifier and its GradCAM per finding; every field has the default used when the key is
    absent."""

    arch: str = "resnet10"
    kinds: tuple[str, ...] = SALIENCY_KINDS  # finding kinds with a sample set that get a classifier
    max_findings: int = 20  # per model: root findings first, then by |effect size| (the report's order)
    max_rest_images: int | None = 5000  # rest images per split (seeded sample beyond it; None: all)
    # weak: the held-out balanced accuracy's 95 % CI reaches 0.5, or the accuracy is below this
    weak_below: float = 0.6
    n_bootstrap: int = 1000  # subject bootstrap replicates of the balanced accuracy's CI

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "SaliencySettings":
        kw = _own(cls, cfg)
        if "kinds" in kw:
            kw["kinds"] = tuple(kw["kinds"])
        s = cls(**kw)
        _check_arch(s.arch)
        if unknown := sorted(set(s.kinds) - set(SALIENCY_KINDS)):
            raise ValueError(f"kinds: {unknown} have no sample set of images; use {list(SALIENCY_KINDS)}")
        if s.max_findings < 0 or not 0.5 <= s.weak_below <= 1 or s.n_bootstrap < 0:
            raise ValueError("max_findings >= 0, 0.5 <= weak_below <= 1 and n_bootstrap >= 0 are required")
        if s.max_rest_images is not None and s.max_rest_images < 1:
            raise ValueError("max_rest_images must be >= 1 (or null: every image)")
        return s


def _own(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in dict(cfg or {}).items() if k in names}


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, not {arch!r}")


_FULL = {"width": 1.0, "crop": 256, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "checkpoint_every": 1_000,
         "log_every": 50}
_CURVES = {**_FULL, "arch": "resnet10", "stem_stride": 2, "epochs": 5, "steps_per_epoch": None,
           "lr_schedule": "constant", "warmup_steps": 200, "max_eval_images": 5000}
_SALIENCY = {**_FULL, "arch": "resnet10", "stem_stride": 2, "epochs": 3, "steps_per_epoch": 500,
             "lr_schedule": "cosine", "warmup_steps": 100, "max_findings": 20, "max_rest_images": 5000,
             "n_bootstrap": 1000}
_DEMO = {"width": 0.125, "crop": 64, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "warmup_steps": 5,
         "checkpoint_every": 1_000, "log_every": 10}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "nako": {"curves": _CURVES, "saliency": _SALIENCY},
    "chexpert": {"curves": _CURVES, "saliency": _SALIENCY},
    "demo": {"curves": {**_DEMO, "arch": "resnet10", "stem_stride": 2, "epochs": 4, "steps_per_epoch": None,
                        "lr_schedule": "constant", "max_eval_images": 1000},
             "saliency": {**_DEMO, "arch": "resnet10", "stem_stride": 1, "epochs": 3, "steps_per_epoch": 30,
                          "lr_schedule": "cosine", "max_findings": 6, "max_rest_images": 1000,
                          "n_bootstrap": 200}},
}


def resolve_config(part: str, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """One subsection's flat settings: the preset's (cfg['preset'], if any) overridden by cfg[part]."""
    if part not in PARTS:
        raise KeyError(f"finding_networks has no part {part!r}; parts: {PARTS}")
    cfg = dict(cfg or {})
    preset = cfg.get("preset")
    if preset is not None and preset not in PRESETS:
        raise KeyError(f"finding_networks: unknown preset {preset!r}; available: {sorted(PRESETS)}")
    return {**(PRESETS[preset][part] if preset else {}), **dict(cfg.get(part) or {})}


def _split(part: str, cls, cfg: Mapping[str, Any] | None):
    flat = resolve_config(part, cfg)
    known = {f.name for c in (SupervisedSettings, cls) for f in dataclasses.fields(c)}
    if unknown := sorted(set(flat) - known):
        raise ValueError(f"finding_networks.{part}: unknown setting(s) {unknown}")
    return SupervisedSettings.from_config(flat), cls.from_config(flat)


def curve_settings(cfg: Mapping[str, Any] | None) -> tuple[SupervisedSettings, CurveSettings]:
    """(engine, protocol) settings of the training curves from the config `finding_networks:` section."""
    return _split("curves", CurveSettings, cfg)


def saliency_settings(cfg: Mapping[str, Any] | None) -> tuple[SupervisedSettings, SaliencySettings]:
    """(engine, protocol) settings of the set-vs-rest classifiers from the config `finding_networks:` section."""
    return _split("saliency", SaliencySettings, cfg)
