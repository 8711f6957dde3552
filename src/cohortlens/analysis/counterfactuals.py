"""Counterfactual strips of the DAE's findings (beyond paper 003; the direction of Atad et al., MELBA 2024): for a
finding with a set of images, the direction in z_sem that separates the set from the rest, and a few test images
decoded from their own DDIM code x_T with their z_sem moved along it (-2σ … +2σ). What a site's protocol or the
other sex's pattern looks like in an image, as far as the model has learnt it.

Decisions (docs/findings.md, "Counterfactual strips"):

- **Which slice.** Each image is shown by the middle one of its center slices (as `discover.explain`'s mean images).
  A volume embedding is its center slices' standardised z_sem concatenated, so the volume-level difference of
  class means splits into one block per center slice; the strip uses the *own block of the decoded slice*, which
  is the difference of the class means of that slice's embeddings (the exact restriction of the volume direction
  to the z_sem being moved; the mean block would average neighbouring slices' directions into it).
- **Direction.** In the standardised space the embeddings are stored in (`embed.autoencoder`'s `train_zscore`):
  u = (mean(set) - mean(rest)) / ‖…‖ at equal recorded continuous traits (the set's coefficient in
  z ~ 1 + set + age, height, weight, …: sex's direction without the height that goes with it), fitted on the images
  outside the test split (the strip shows test images it was not fitted on). σ is the standard deviation of the
  projections Z·u of those images (set and rest together): ±2σ spans the cohort along u. The step in raw z_sem,
  which the decoder takes, is s·σ·(u ⊙ std) with the train-split std of the embedding's metadata (no
  normalisation: std = 1). +σ moves towards the set.
- **Sets.** A categorical attribute leak: that value vs the other recorded values. A date effect within one site
  (`site×date`): the images after the onset vs the same site's other images. A cluster: its members vs the rest
  of the region. A discordant subgroup mixes the attribute's values (men that look female and women that look
  male), so its set-vs-rest difference cancels: its strip moves its members along the attribute's own direction
  (first category vs the others). Data-quality flags (outliers, near-duplicates, label issues) have no shared
  direction, echoes are shown under their root cause, and cross-region findings have one per region: none of
  these gets a strip.
- **Which findings.** Root findings of the kinds above, one per (kind, attribute) in turn (largest effect first),
  until `max_findings`; a set or rest smaller than `min_set_images` is skipped.
- **A judge per strip.** Whether the decodes move towards the set is checked by a classifier that never saw the
  model (`analysis.strip_judge`), fitted on a sample of the direction's own images; the index keeps its verdict.
"""

from __future__ import annotations

import hashlib
import logging
import math
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from cohortlens.analysis.counterfactual_direction import direction_covariates, finding_direction
from cohortlens.analysis.discover.core import INTERACTION_SEP
from cohortlens.analysis.panels import diverging_panel, grey_panel, plain_text
from cohortlens.analysis.panels import font as load_font
from cohortlens.analysis.table import AnalysisTable, attribute_values, load_analysis_table, present
from cohortlens.io.tables import atomic_path, read_parquet_metadata, write_parquet
from cohortlens.preprocess.store import SliceStore, center_crop
from cohortlens.runtime import limit_threads, select_device
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)

KINDS = ("attribute_leak", "discordant_subgroup", "cluster")  # the kinds with a direction, in this order
TILE = 128  # pixels per decoded image in the strip


@dataclass(frozen=True)
class CounterfactualSettings:
    """Settings of the counterfactual strips (config `counterfactuals:`)."""

    max_findings: int = 8  # strips per model
    images: int = 4  # test images per strip: half from the set, half from the rest
    ddim_steps: int = 20  # DDIM steps of the encode and of every decode
    sigmas: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)  # positions along the direction, in σ
    min_set_images: int = 10  # a set (or rest) outside the test split smaller than this gets no direction
    seed: int = 0  # which test images are shown (and the judge's sample and folds)
    judge_images: int = 2000  # images outside the test split the strip's judge is fitted on (half per side)
    judge_components: int = 32  # pixel principal components of the judge
    device: str = "auto"  # auto: CUDA when visible


def settings(cfg: Mapping | None) -> CounterfactualSettings:
    cfg = dict(cfg or {})
    if "sigmas" in cfg:
        cfg["sigmas"] = tuple(float(s) for s in cfg["sigmas"])
    return CounterfactualSettings(**cfg)


def counterfactual_grid(model, images, z_sem, direction, sigma: float = 1.0,
                        sigmas: Sequence[float] = (-2, -1, 0, 1, 2), ddim_steps: int = 20) -> np.ndarray:
    """(N, S, H, W) float32 decodes: every image (N, 1, H, W) DDIM-encoded to x_T under its own z_sem (N, d), then
    decoded under z_sem + s·σ·direction for each s of `sigmas`. s = 0 decodes under z_sem itself: the plain DDIM
    round trip."""
    import torch

    device = next(model.parameters()).device
    x0 = torch.as_tensor(np.asarray(images, dtype=np.float32), device=device)
    if x0.ndim == 3:
        x0 = x0[:, None]
    z = torch.as_tensor(np.asarray(z_sem, dtype=np.float32), device=device)
    d = torch.as_tensor(np.asarray(direction, dtype=np.float32), device=device)
    model.eval()
    with torch.no_grad():
        x_T = model.ddim_encode(x0, z, ddim_steps)
        out = np.empty((x0.shape[0], len(sigmas), *x0.shape[-2:]), dtype=np.float32)
        for j, s in enumerate(sigmas):
            zs = z if s == 0 else z + float(s) * float(sigma) * d
            out[:, j] = model.ddim_decode(x_T, zs, ddim_steps)[:, 0].float().cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------- findings


def select_findings(findings: pl.DataFrame) -> list[dict]:
    """Candidate findings in the order they get a strip: root findings of KINDS with a set (a categorical leak's
    value is one), one per (kind, attribute) in turn, each group largest |effect| first. The stage takes them in
    this order until `max_findings` strips are drawn."""
    if findings.height == 0:
        return []
    rows = []
    for r in findings.iter_rows(named=True):
        root = not r.get("explained_by")
        has_set = bool(r.get("sample_ids")) or (r["kind"] == "attribute_leak" and r.get("value") is not None
                                                and INTERACTION_SEP not in str(r["attribute"]))
        if r["kind"] in KINDS and root and has_set and r["region"] != ALL_REGIONS:
            rows.append(r)
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: -abs(r["effect_size"] or 0.0)):
        groups.setdefault((KINDS.index(r["kind"]), r["attribute"]), []).append(r)
    order = sorted(groups, key=lambda g: (g[0], -abs(groups[g][0]["effect_size"] or 0.0)))
    ranked = [groups[g][i] for i in range(max(map(len, groups.values()), default=0)) for g in order
              if i < len(groups[g])]
    return ranked


@dataclass
class Contrast:
    """The two sides of a finding within its region (masks over the region's images) and what to show first."""

    in_set: np.ndarray
    in_rest: np.ndarray
    set_label: str
    rest_label: str
    show: np.ndarray | None = None  # images shown by preference (a discordant subgroup's members)


def finding_contrast(finding: Mapping, frame: pl.DataFrame, table: AnalysisTable) -> Contrast | None:
    """Set vs rest of a finding over `frame` (one region's images, attributes joined); None when it has none."""
    members = frame["image_uid"].is_in(list(finding.get("sample_ids") or [])).to_numpy()
    attribute, value = str(finding["attribute"]), finding.get("value")
    spec = table.specs.get(attribute.split(INTERACTION_SEP)[0])
    if finding["kind"] == "attribute_leak" and INTERACTION_SEP in attribute and spec is not None:
        if spec.is_categorical and value is not None and spec.name in frame.columns:
            stratum = attribute_values(frame, spec) == str(value)
            return Contrast(members, stratum & ~members, f"{spec.name} {value}: set", f"rest of {spec.name} {value}")
        return None
    if finding["kind"] in ("attribute_leak", "discordant_subgroup"):
        if spec is None or not spec.is_categorical or spec.name not in frame.columns:
            return None
        vals = attribute_values(frame, spec)
        ok = present(vals)
        if finding["kind"] == "discordant_subgroup":
            cats = list(spec.categories or sorted({str(v) for v in vals[ok]}))
            value = cats[0] if cats else None
        if value is None:
            return None
        is_value = ok & (vals == str(value))
        others = sorted({str(v) for v in vals[ok & ~is_value]})
        rest_label = f"{spec.name}={others[0]}" if len(others) == 1 else f"{spec.name}!={value}"
        show = members if finding["kind"] == "discordant_subgroup" else None
        return Contrast(is_value, ok & ~is_value, f"{spec.name}={value}", rest_label, show)
    if members.any():
        return Contrast(members, ~members, "set", "rest")
    return None


# ---------------------------------------------------------------------------------------------- images


def decoded_slices(table: AnalysisTable) -> tuple[pl.DataFrame, np.ndarray]:
    """One row per image: the middle one of its center slices (frame rows and their embedding rows)."""
    frame = table.frame.with_row_index("_row").sort("image_uid", "slice_position")
    picked = frame.group_by("image_uid", maintain_order=True).agg(pl.all().get(pl.len() // 2))
    return picked.drop("_row"), table.X[picked["_row"].to_numpy()]


def _pick(rng: np.random.Generator, pool: np.ndarray, k: int) -> list[int]:
    idx = np.flatnonzero(pool)
    return sorted(rng.choice(idx, min(k, len(idx)), replace=False).tolist()) if k > 0 and len(idx) else []


def choose_images(c: Contrast, is_test: np.ndarray, n: int, rng: np.random.Generator) -> tuple[list[int], list[str]]:
    """Up to n test images: the preferred ones (c.show) first, else half from the set and half from the rest, filled
    from the other side when one is short. Returns (row indices, side labels)."""
    if c.show is not None:
        first = _pick(rng, c.show & is_test, n)
        rest = _pick(rng, ~c.show & (c.in_set | c.in_rest) & is_test, n - len(first))
        chosen = first + rest
    else:
        k = math.ceil(n / 2)
        a = _pick(rng, c.in_set & is_test, k)
        b = _pick(rng, c.in_rest & is_test, n - len(a))
        a += _pick(rng, c.in_set & is_test & ~np.isin(np.arange(len(is_test)), a), n - len(a) - len(b))
        chosen = a + b
    member = c.show if c.show is not None else np.zeros(len(is_test), bool)
    sides = [("member, " if member[i] else "") + (c.set_label if c.in_set[i] else c.rest_label) for i in chosen]
    return chosen, sides


def render_strip(path: PathLike, title: str, subtitle: str, grid: np.ndarray, inputs: np.ndarray,
                 sides: Sequence[str], sigmas: Sequence[float]) -> None:
    """One PNG: per image a row [input | decodes at each σ | decode(last σ) - decode(first σ)], the difference
    maps on one colour scale (red: brighter at the last σ)."""
    title_font, small = load_font(13), load_font(11)
    header = [*textwrap.wrap(plain_text(title), 130)[:3], *textwrap.wrap(plain_text(subtitle), 130)[:2]]
    gap, label_w, head_h, col_h = 6, 150, 8 + 16 * len(header), 16
    diffs = grid[:, -1] - grid[:, 0]
    scale = float(np.abs(diffs).max()) or 1e-6
    labels = ["input", *[f"{s:+g} sd" if s else "0 (round trip)" for s in sigmas],
              f"{sigmas[-1]:+g} sd minus {sigmas[0]:+g} sd (max |diff| {scale:.2f})"]
    width = label_w + (len(sigmas) + 2) * (TILE + gap) + 120
    height = head_h + col_h + len(grid) * (TILE + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header):
        draw.text((gap, 4 + 16 * i), line, fill=(0, 0, 0), font=title_font)
    for j, label in enumerate(labels):
        draw.text((label_w + j * (TILE + gap), head_h), label, fill=(40, 40, 40), font=small)
    for i in range(len(grid)):
        y = head_h + col_h + i * (TILE + gap)
        draw.text((gap, y + TILE // 2 - 6), plain_text(sides[i])[:24], fill=(40, 40, 40), font=small)
        panels = [grey_panel(inputs[i], TILE), *[grey_panel(g, TILE) for g in grid[i]],
                  diverging_panel(diffs[i], TILE, scale)]
        for j, panel in enumerate(panels):
            canvas.paste(panel, (label_w + j * (TILE + gap), y))
    with atomic_path(path, ".png") as tmp:
        canvas.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------- the stage


# One row per strip (results/counterfactuals/{model}.parquet). direction_norm: ‖mean(set) - mean(rest)‖ in the
# standardised space; raw_norm: ‖u ⊙ std‖ (the raw z_sem step of one standardised unit); sigma, gap_sigma: see
# FindingDirection; image_uids / slice_uids / sides: the rows of the strip; change_*: |decode(last σ) - decode(first
# σ)| per pixel, its mean per image and over all, and the per-pixel mean over the images (height × width, row-major);
# png / grid: the strip and its decodes (float16 .npy, images × sigmas × height × width) in the folder beside it.
# judge_*: the independent pixel-space check of the strip (`analysis.strip_judge`): its cross-validated balanced
# accuracy and sample, its logit(last σ decode) - logit(first σ decode) per image in units of its set-vs-rest logit
# gap (judge_shift), and how many of those are > 0; judge_fold_median: the median shift as each cross-validation
# fold's judge scores it (the verdict holds only where they agree); null when either side has too few images to fit
# it. fitted_outside_test: false where a side had too few images outside the test split, so that the direction and the
# judge were fitted on all images, test split included.
INDEX_SCHEMA = {"finding_id": pl.Utf8, "kind": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "value": pl.Utf8,
                "set": pl.Utf8, "rest": pl.Utf8, "n_set": pl.Int64, "n_rest": pl.Int64, "direction_norm": pl.Float64,
                "raw_norm": pl.Float64, "sigma": pl.Float64, "gap_sigma": pl.Float64, "sigmas": pl.List(pl.Float64),
                "image_uids": pl.List(pl.Utf8), "slice_uids": pl.List(pl.Utf8), "sides": pl.List(pl.Utf8),
                "change_per_image": pl.List(pl.Float64), "change_mean": pl.Float64, "height": pl.Int64,
                "width": pl.Int64, "change_map": pl.List(pl.Float32), "png": pl.Utf8, "grid": pl.Utf8,
                "judge_balanced_accuracy": pl.Float64, "judge_n_set": pl.Int64, "judge_n_rest": pl.Int64,
                "judge_shift": pl.List(pl.Float64), "judge_agrees": pl.Int64,
                "judge_fold_median": pl.List(pl.Float64), "fitted_outside_test": pl.Boolean}


def _normalisation(slices_parquet: PathLike, dim: int) -> tuple[np.ndarray, np.ndarray]:
    norm = read_parquet_metadata(slices_parquet).get("normalisation") or {}
    if not isinstance(norm, dict) or "std" not in norm:
        return np.zeros(dim), np.ones(dim)  # raw z_sem: standardised space = raw space
    return np.asarray(norm["mean"], dtype=np.float64), np.asarray(norm["std"], dtype=np.float64)


def counterfactuals(model_path: PathLike, slices_parquet: PathLike, index_parquet: PathLike,
                    findings_parquet: PathLike, subjects: PathLike, images: PathLike | None,
                    splits: PathLike | None, attributes: Mapping | None, cfg: Mapping | None,
                    out_dir: PathLike, out_index: PathLike, threads: int = 1) -> pl.DataFrame:
    """The counterfactuals stage of one DAE: per selected finding a strip `out_dir/{finding_id}.png` and its decodes
    `out_dir/{finding_id}.npy`, and one row of INDEX_SCHEMA in `out_index` (Parquet; metadata: the model, the
    settings and the direction's definition). `attributes`: the config `attributes:` (None: subjects.parquet's)."""
    s = settings(cfg)
    if len(s.sigmas) < 2:
        raise ValueError("counterfactuals: sigmas needs at least two positions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # a Snakemake directory() output, even if no finding has a strip
    device = select_device(s.device)
    import torch  # noqa: F401  (imported before limit_threads so that it caps torch's threads too)

    from cohortlens.models.modelfile import load_model

    with limit_threads(threads, device=device):
        model, info = load_model(model_path, device)
        if not hasattr(model, "ddim_decode"):
            raise ValueError(f"{model_path}: model {info['model']!r} has no DDIM decoder (counterfactuals need a dae)")
        table = load_analysis_table(slices_parquet, subjects, splits, images, attributes=attributes,
                                    center_only=True)
        frame, Z = decoded_slices(table)
        _, std = _normalisation(slices_parquet, Z.shape[1])
        crop = int(info["config"].get("crop") or info["config"].get("image_size"))
        store = SliceStore(index_parquet)
        rows: list[dict] = []
        for f in select_findings(pl.read_parquet(findings_parquet)):
            if len(rows) >= s.max_findings:
                break
            row = _strip(f, frame, Z, table, std, store, crop, model, s, out_dir)
            if row is not None:
                rows.append(row)
                log.info("counterfactuals %s: sigma %.3g, mean |change| %.3g", row["finding_id"], row["sigma"],
                         row["change_mean"])
    index = pl.DataFrame(rows, schema=INDEX_SCHEMA)
    meta = {"model": info["model"], "weights": info["weights"], "settings": asdict(s),
            "direction": "difference of class means of the decoded center slice's standardised z_sem (its own block "
                         "of the volume embedding) at equal recorded continuous traits (least squares), unit length; "
                         "sigma: std of the projections; raw = unit * std",
            "judge": "PCA of the pixels + the same traits, class-balanced logistic regression, fitted on a sample of "
                     "the direction's images (outside the test split); balanced accuracy out of fold; judge_shift: logit "
                     "change from the first to the last sigma over the set-vs-rest mean logit gap; judge_agrees: "
                     "strip images whose shift is > 0; judge_fold_median: the median shift by each cross-validation fold's judge"}
    write_parquet(index, out_index, metadata=meta)
    return index


def _strip(f: dict, frame: pl.DataFrame, Z: np.ndarray, table: AnalysisTable, std: np.ndarray, store: SliceStore,
           crop: int, model, s: CounterfactualSettings, out_dir: Path) -> dict | None:
    import torch

    mask = (frame["region"] == f["region"]).to_numpy()
    region, Zr = frame.filter(pl.Series(mask)), Z[mask]
    c = finding_contrast(f, region, table)
    if c is None:
        return None
    split = region["split"].to_numpy() if "split" in region.columns else np.full(region.height, None)
    is_test = split == "test"
    fit = ~is_test if ((c.in_set & ~is_test).sum() >= s.min_set_images
                       and (c.in_rest & ~is_test).sum() >= s.min_set_images) else np.ones(len(is_test), bool)
    if (c.in_set & fit).sum() < s.min_set_images or (c.in_rest & fit).sum() < s.min_set_images:
        log.info("counterfactuals %s: set %d / rest %d images, fewer than %d: no strip", f["finding_id"],
                 (c.in_set & fit).sum(), (c.in_rest & fit).sum(), s.min_set_images)
        return None
    covariates, _ = direction_covariates(region, table, str(f["attribute"]))
    direction = finding_direction(Zr[fit], c.in_set[fit], c.in_rest[fit], std, covariates[fit])
    shown_pool = is_test if is_test.any() else np.ones(len(is_test), bool)
    rng = np.random.default_rng([s.seed, _stable(f["finding_id"])])
    chosen, sides = choose_images(c, shown_pool, s.images, rng)
    if not chosen:
        return None
    picked = region[chosen]
    x = _slices(picked, store, crop, f["finding_id"])
    device = next(model.parameters()).device
    with torch.no_grad():
        z = model.embed(torch.from_numpy(np.ascontiguousarray(x))[:, None].to(device)).float().cpu().numpy()
    grid = counterfactual_grid(model, x, z, direction.raw, direction.sigma, s.sigmas, s.ddim_steps)
    change = np.abs(grid[:, -1] - grid[:, 0])
    judged = _judge(region, c, fit, covariates, store, crop, s, rng, grid, f["finding_id"])
    png = f"{f['finding_id']}.png"
    subtitle = (f"{c.set_label} (n={direction.n_set}) vs {c.rest_label} (n={direction.n_rest}): z_sem moved along "
                f"the difference of their means, 1 sd = {direction.sigma:.2f} (class means {direction.gap_sigma:.1f} "
                f"sd apart); each row decoded from its own DDIM code, {s.ddim_steps} steps")
    render_strip(out_dir / png, f"{f['finding_id']}: {f.get('description') or ''}", subtitle, grid, x, sides,
                 s.sigmas)
    with atomic_path(out_dir / f"{f['finding_id']}.npy", ".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, grid.astype(np.float16))  # the decodes themselves (images × sigmas × H × W), for analyses
    return {"finding_id": f["finding_id"], "kind": f["kind"], "region": f["region"], "attribute": f["attribute"],
            "value": None if f.get("value") is None else str(f["value"]), "set": c.set_label, "rest": c.rest_label,
            "n_set": direction.n_set, "n_rest": direction.n_rest, "direction_norm": direction.mean_gap,
            "raw_norm": float(np.linalg.norm(direction.raw)), "sigma": direction.sigma,
            "gap_sigma": direction.gap_sigma, "sigmas": [float(v) for v in s.sigmas],
            "image_uids": picked["image_uid"].to_list(), "slice_uids": picked["slice_uid"].to_list(),
            "sides": sides, "change_per_image": change.mean(axis=(1, 2)).astype(float).tolist(),
            "change_mean": float(change.mean()), "height": int(change.shape[1]), "width": int(change.shape[2]),
            "change_map": change.mean(0).astype(np.float32).ravel().tolist(), "png": png,
            "grid": f"{f['finding_id']}.npy", "fitted_outside_test": not bool((fit & is_test).any()), **judged}


def _slices(images: pl.DataFrame, store: SliceStore, crop: int, finding_id: str) -> np.ndarray:
    """The decoded slice of each row of `images` (frame rows with `slice_uid`), in row order, center-cropped."""
    where = images.select("slice_uid").with_row_index("_order").join(store.index, on="slice_uid").sort("_order")
    if where.height != images.height:
        raise ValueError(f"counterfactuals {finding_id}: slices of the embedding missing from the index")
    return center_crop(store.read(where), crop)


def _judge(region: pl.DataFrame, c: Contrast, fit: np.ndarray, covariates: np.ndarray, store: SliceStore, crop: int,
           s: CounterfactualSettings, rng: np.random.Generator, grid: np.ndarray, finding_id: str) -> dict:
    """The strip's judge (`analysis.strip_judge`) on the direction's own images (a sample), scoring the decodes."""
    from cohortlens.analysis.strip_judge import fit_strip_judge, judge_sample

    rows = judge_sample(c.in_set & fit, c.in_rest & fit, s.judge_images, rng)
    images = _slices(region[rows], store, crop, finding_id)  # a missing slice is an error, not "no judge"
    try:
        judge = fit_strip_judge(images, c.in_set[rows], covariates[rows], n_components=s.judge_components,
                                seed=s.seed)
    except ValueError as err:  # too few images on a side, or none the judge can tell apart
        log.info("counterfactuals %s: no judge (%s)", finding_id, err)
        return dict.fromkeys(k for k in INDEX_SCHEMA if k.startswith("judge_"))
    delta = judge.shift(grid[:, 0], grid[:, -1])
    return {"judge_balanced_accuracy": judge.balanced_accuracy, "judge_n_set": judge.n_set,
            "judge_n_rest": judge.n_rest, "judge_shift": delta.astype(float).tolist(),
            "judge_agrees": int((delta > 0).sum()),
            "judge_fold_median": np.median(judge.fold_shifts(grid[:, 0], grid[:, -1]), axis=1).astype(float).tolist()}


def _stable(text: str) -> int:
    """A seed from a string that does not change between processes (str hash() does)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
