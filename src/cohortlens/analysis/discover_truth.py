"""Recall of the discover stage against a demo cohort's planted effects (`data/demo/ground_truth.json`).

One row per planted effect and per negative control: was it found, by which findings, and how well.

Matching rules (a finding counts when its FDR-adjusted p-value is below `alpha`, or, for cleanlab's
untested flags, when it exists):

* effect without `value` (sex, age, weight, height): an `attribute_leak` of that attribute in *every* listed
  region.
* effect with `value` (a site): a `cluster` of that attribute and value in a listed region with an enrichment
  ratio of at least `min_enrichment`. Clusters of the same value in regions the effect does not list are
  returned as `unexpected_ids` (the site effects are neck-only).
  With `interaction` (the Neubrandenburg flat neck from `from_date` on): additionally a `site×date` finding
  for that site in a listed region whose estimated onset is `from` a date within `onset_tolerance_days` of
  `from_date`.
* effect with per-region `subjects` (the discordant subgroup): a significant `discordant_subgroup` finding
  in every listed region and the cross-region co-occurrence finding; precision and recall of the flagged
  images against the planted (subject, region) pairs.
* negative control (`date`): flagged when any finding is named exactly `date`. A `site×date` finding does not
  count: the detectors name a date effect `date` only when no single site carries it
  (`discover_core.confine_to_stratum`), because the control's claim is "no effect of date alone", and the
  demo does plant a date effect inside Neubrandenburg.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Mapping

import polars as pl

from cohortlens.analysis.discover_core import ALL_REGIONS, INTERACTION_SEP

PathLike = str | os.PathLike

RECALL_SCHEMA = {
    "effect": pl.Utf8, "attribute": pl.Utf8, "regions": pl.List(pl.Utf8), "expected": pl.Boolean,
    "found": pl.Boolean, "finding_ids": pl.List(pl.Utf8), "unexpected_ids": pl.List(pl.Utf8),
    "precision": pl.Float64, "recall": pl.Float64, "detail": pl.Utf8,
}


def _significant(findings: pl.DataFrame, alpha: float) -> pl.DataFrame:
    return findings.filter(pl.col("p_adjusted").is_null() | (pl.col("p_adjusted") < alpha))


def _details(row: Mapping) -> dict:
    try:
        return json.loads(row.get("details") or "{}")
    except (TypeError, ValueError):
        return {}


def ground_truth_recall(findings: pl.DataFrame | PathLike, ground_truth_json: PathLike | Mapping,
                        alpha: float = 0.05, min_enrichment: float = 1.5,
                        onset_tolerance_days: int = 120) -> pl.DataFrame:
    """Match findings (a findings frame or parquet) against the planted effects of ground_truth.json."""
    frame = findings if isinstance(findings, pl.DataFrame) else pl.read_parquet(findings)
    truth = ground_truth_json if isinstance(ground_truth_json, Mapping) else json.loads(
        Path(ground_truth_json).read_text())
    sig = _significant(frame, alpha)
    rows = []
    for effect in truth.get("effects", []):
        if isinstance(effect.get("subjects"), Mapping):
            rows.append(_subgroup_row(sig, effect))
        elif "value" in effect:
            rows.append(_cluster_row(sig, effect, min_enrichment, onset_tolerance_days))
        else:
            rows.append(_leak_row(sig, effect))
    for control in truth.get("negative_controls", []):
        rows.append(_control_row(sig, control))
    return pl.DataFrame(rows, schema=RECALL_SCHEMA)


def _row(effect, attribute, regions, expected, found, ids, detail, unexpected=(), precision=None, recall=None):
    return {"effect": effect, "attribute": attribute, "regions": list(regions), "expected": expected,
            "found": bool(found), "finding_ids": list(ids), "unexpected_ids": list(unexpected),
            "precision": precision, "recall": recall, "detail": detail}


def _leak_row(sig: pl.DataFrame, effect: Mapping) -> dict:
    attr, regions = effect["attribute"], list(effect.get("regions", []))
    hits = sig.filter((pl.col("kind") == "attribute_leak") & (pl.col("attribute") == attr))
    per_region = {r: hits.filter(pl.col("region") == r) for r in regions}
    missing = [r for r, h in per_region.items() if h.height == 0]
    parts = [f"{r}: {h['effect_measure'][0]} {h['effect_size'][0]:.2f}, q={h['p_adjusted'][0]:.2g}"
             for r, h in per_region.items() if h.height]
    detail = "; ".join(parts) + (f"; not found in {', '.join(missing)}" if missing else "")
    return _row(effect["name"], attr, regions, True, not missing and bool(regions),
                [i for h in per_region.values() for i in h["finding_id"].to_list()], detail)


def _cluster_row(sig: pl.DataFrame, effect: Mapping, min_enrichment: float, tolerance: int) -> dict:
    attr, value, regions = effect["attribute"], str(effect["value"]), list(effect.get("regions", []))
    clusters = sig.filter((pl.col("kind") == "cluster") & (pl.col("attribute") == attr)
                          & (pl.col("value") == value) & (pl.col("effect_size") >= min_enrichment))
    inside = clusters.filter(pl.col("region").is_in(regions))
    unexpected = clusters.filter(~pl.col("region").is_in(regions))["finding_id"].to_list()
    ids = inside["finding_id"].to_list()
    found = inside.height > 0
    detail = "; ".join(f"{r['region']}: {r['description']}" for r in inside.iter_rows(named=True)) or \
        f"no cluster of {attr} {value} in {', '.join(regions)}"
    if effect.get("interaction"):
        ok, inter_ids, inter_detail = _interaction(sig, effect, regions, tolerance)
        found, ids, detail = found and ok, ids + inter_ids, f"{detail} | {inter_detail}"
    return _row(effect["name"], attr, regions, True, found, ids, detail, unexpected)


def _interaction(sig: pl.DataFrame, effect: Mapping, regions, tolerance: int) -> tuple[bool, list[str], str]:
    attr, value, other = effect["attribute"], str(effect["value"]), effect["interaction"]
    names = pl.col("attribute").str.ends_with(f"{INTERACTION_SEP}{other}") & pl.col("attribute").str.contains(attr)
    hits = sig.filter(names & pl.col("region").is_in(regions) & pl.col("value").str.starts_with(value))
    want = effect.get("from_date")
    matched, notes = [], []
    for row in hits.iter_rows(named=True):
        d = _details(row)
        if want is None:
            matched.append(row["finding_id"])
            continue
        if "onset" not in d:
            continue
        gap = abs((_dt.date.fromisoformat(d["onset"]) - _dt.date.fromisoformat(str(want)[:10])).days)
        notes.append(f"{row['finding_id']}: {d.get('direction')} {d['onset']} ({gap} days from {want})")
        if d.get("direction") == "from" and gap <= tolerance:
            matched.append(row["finding_id"])
    if not hits.height:
        return False, [], f"no significant {attr}{INTERACTION_SEP}{other} finding for {value}"
    return bool(matched), matched, "; ".join(notes) or f"{len(matched)} {attr}{INTERACTION_SEP}{other} findings"


def _subgroup_row(sig: pl.DataFrame, effect: Mapping) -> dict:
    attr, planted = effect["attribute"], effect["subjects"]
    regions = list(effect.get("regions", planted.keys()))
    hits = sig.filter((pl.col("kind") == "discordant_subgroup") & (pl.col("attribute") == attr))
    ids, parts, missing = [], [], []
    tp = n_flag = n_true = 0
    for region in regions:
        h = hits.filter(pl.col("region") == region)
        truth = {str(s) for s in planted.get(region, [])}
        if h.height == 0:
            missing.append(region)
            n_true += len(truth)
            continue
        flagged = {uid.split("/")[0] for uid in h["sample_ids"][0]}
        hit = len(flagged & truth)
        tp, n_flag, n_true = tp + hit, n_flag + len(flagged), n_true + len(truth)
        ids.append(h["finding_id"][0])
        parts.append(f"{region}: {len(flagged)} flagged, {hit} of {len(truth)} planted "
                     f"(precision {hit / max(len(flagged), 1):.2f}, recall {hit / max(len(truth), 1):.2f})")
    co = hits.filter(pl.col("region") == ALL_REGIONS)
    if co.height:
        ids.append(co["finding_id"][0])
        parts.append(f"co-occurrence: {co['effect_size'][0]:.1f}× the independence expectation, "
                     f"q={co['p_adjusted'][0]:.2g}")
    else:
        parts.append("no significant co-occurrence across regions")
    if missing:
        parts.append(f"not found in {', '.join(missing)}")
    return _row(effect["name"], attr, regions, True, not missing and co.height > 0, ids, "; ".join(parts),
                precision=tp / n_flag if n_flag else None, recall=tp / n_true if n_true else None)


def _control_row(sig: pl.DataFrame, control: Mapping) -> dict:
    attr = control["attribute"]
    hits = sig.filter(pl.col("attribute") == attr)
    detail = "; ".join(hits["description"].to_list()) or f"no finding names {attr} alone"
    return _row(f"negative control: {attr}", attr, [], False, hits.height > 0, hits["finding_id"].to_list(), detail)
