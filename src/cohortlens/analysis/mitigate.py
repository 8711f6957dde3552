"""The mitigate stage: remove a protected attribute from embeddings, then re-probe.

Three methods, each writing embeddings in the contract schema (same key columns as the input, `embedding`
fixed_size_list<float32>[d], metadata with `model`, `dim`, `source_model` and a `mitigation` record):

- `leace`: LEAst-squares Concept Erasure (concept-erasure's LeaceFitter), the closed-form affine map that
  makes the attribute's class means (or its covariance with a continuous value) identical in the fitted
  data, with the least change to the embedding. No linear classifier trained on erased train data can
  beat a constant predictor. Fitted per region on the train split.
- `inlp`: iterative nullspace projection (Ravfogel et al. 2020): fit a linear classifier (or ridge
  regressor), project the embedding onto the nullspace of its weights, repeat. Per region, train split.
- `avae`: the adversarial VAE of paper 002 (`cohortlens.models.adversarial_vae`), one network for all
  regions with adversaries conditioned on region; the embedding is μ.

`reprobe` compares the original embedding with each mitigated one: for protected attributes (should drop to
chance) and target attributes (should be kept), the probes of `attack` — linear (what LEACE guarantees against),
and two tuned attackers (RBF SVM and MLP, hyper-parameters by CV on the train split) — trained on the train
split and scored on the test split, each with a bootstrap interval and a permutation test against chance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch
from concept_erasure import LeaceFitter
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.preprocessing import StandardScaler

from cohortlens.analysis.reprobe import REPROBE_SCHEMA, reprobe  # noqa: F401  (the stage's API)
from cohortlens.analysis.table import AnalysisTable, AttributeSpec, load_analysis_table, present
from cohortlens.embed.parquet import EmbeddingWriter
from cohortlens.io.tables import atomic_path, read_parquet_metadata, write_parquet
from cohortlens.models.adversarial_vae import AdversarialVAEConfig, fit_adversarial_vae
from cohortlens.runtime import select_device, threaded
from cohortlens.types import ALL_REGIONS, PathLike

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- helpers

def _load(embeddings: PathLike, subjects: PathLike, splits: PathLike, images: PathLike | None,
          attributes: Mapping | None) -> AnalysisTable:
    return load_analysis_table(embeddings, subjects, splits, images, attributes=attributes)


def _concept(table: AnalysisTable, attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """The attribute as LEACE's z: one-hot for categorical (declared order), standardised value otherwise;
    and the mask of rows where it is recorded."""
    spec = table.spec(attribute)
    raw = table.values(attribute)
    ok = present(raw)
    if spec.is_categorical:
        seen = {v for v in raw[ok]}
        classes = [c for c in (spec.categories or ()) if c in seen] + sorted(seen - set(spec.categories or ()))
        lookup = {c: i for i, c in enumerate(classes)}
        z = np.zeros((len(raw), len(classes)))
        rows = np.flatnonzero(ok)
        z[rows, [lookup[v] for v in raw[ok]]] = 1.0
        return z, ok
    values = np.where(ok, raw, 0.0).astype(np.float64)
    sd = values[ok].std() if ok.any() else 1.0
    return ((values - values[ok].mean()) / (sd if sd > 0 else 1.0))[:, None], ok


def _write_like(source: PathLike, frame: pl.DataFrame, X: np.ndarray, out_path: PathLike, metadata: dict) -> None:
    """Write `X` with the source file's key columns (names and types) in the embedding contract."""
    schema = pq.read_schema(source)
    keys = {name: schema.field(name).type for name in schema.names if name != "embedding"}
    with EmbeddingWriter(out_path, keys, X.shape[1], metadata) as writer:
        writer.write(frame.select(list(keys)), X)


def _output_metadata(source: PathLike, out_path: PathLike, dim: int, mitigation: dict, model: str | None) -> dict:
    src_meta = read_parquet_metadata(source)
    src_model = src_meta.get("model", Path(source).parent.name)
    meta = {k: v for k, v in src_meta.items() if k not in ("dim", "model")}
    meta.update(model=model or Path(out_path).parent.name, dim=int(dim), source_model=src_model,
                mitigation=mitigation)
    return meta


def _regions(table: AnalysisTable, per_region: bool) -> list[tuple[str, np.ndarray]]:
    if not per_region:
        return [(ALL_REGIONS, np.ones(table.frame.height, bool))]
    region = table.frame["region"].to_numpy()
    return [(r, region == r) for r in sorted(set(region.tolist()))]


# ------------------------------------------------------------------------------------------- LEACE

@threaded
def erase_leace(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    attribute: str,
    out_path: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    per_region: bool = True,
    fit_split: str = "train",
    model: str | None = None,
) -> dict:
    """LEACE-erase `attribute` from an embedding file; writes `out_path` in the same schema.

    The eraser is fitted in float64 per region on `fit_split` rows where the attribute is recorded and
    applied to every row of that region. `constrain_cov_trace` is off: it mixes in an orthogonal projection
    that no longer zeroes the cross-covariance, and these embeddings are not fed back into a network.
    """
    table = _load(embeddings, subjects, splits, images, attributes)
    z, ok = _concept(table, attribute)
    fit_rows = table.split_mask(fit_split) & ok
    X = table.X.astype(np.float64)
    out = table.X.copy()
    skipped, ranks = [], {}
    for region, rows in _regions(table, per_region):
        fit = rows & fit_rows
        zf = z[fit]
        if fit.sum() < 3 or np.linalg.matrix_rank(zf - zf.mean(0)) == 0:
            skipped.append(region)  # nothing to erase against: one class (or no spread) in this region
            continue
        fitter = LeaceFitter.fit(torch.from_numpy(X[fit]), torch.from_numpy(zf), constrain_cov_trace=False)
        eraser = fitter.eraser
        out[rows] = eraser(torch.from_numpy(X[rows])).numpy().astype(np.float32)
        ranks[region] = int(torch.linalg.matrix_rank(eraser.proj_left).item())
    if skipped:
        log.warning("leace %s: not erased in %s (fewer than two values on %s)", attribute, skipped, fit_split)
    mitigation = {"method": "leace", "attributes": [attribute], "fit_split": fit_split, "per_region": per_region,
                  "erased_rank": ranks, "not_erased": skipped}
    _write_like(embeddings, table.frame, out, out_path,
                _output_metadata(embeddings, out_path, out.shape[1], mitigation, model))
    return {"rows": int(out.shape[0]), "dim": int(out.shape[1]), **mitigation}


# ------------------------------------------------------------------------------------------- INLP

def _inlp_step(X: np.ndarray, y: np.ndarray, spec: AttributeSpec, C: float, seed: int) -> tuple[np.ndarray, float]:
    """One INLP round: weight vectors (rows, in the coordinates of X) of a strongly regularised linear model
    and its excess over chance on the fitted rows (balanced accuracy − 1/K, or R²)."""
    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X)
    if spec.is_categorical:
        clf = LogisticRegression(C=C, max_iter=5000, class_weight="balanced", random_state=seed).fit(Xs, y)
        W = np.atleast_2d(clf.coef_)
        excess = balanced_accuracy_score(y, clf.predict(Xs)) - 1.0 / len(clf.classes_)
    else:
        # alpha = 1/C on the same scale as the logistic penalty: sum of squared errors + alpha·|w|²
        reg = Ridge(alpha=1.0 / C).fit(Xs, (y - y.mean()) / (y.std() or 1.0))
        W = np.atleast_2d(reg.coef_)
        excess = r2_score((y - y.mean()) / (y.std() or 1.0), reg.predict(Xs))
    # a weight w on standardised features is the direction w / scale in the original coordinates
    return W / scaler.scale_[None, :], float(excess)


@threaded
def erase_inlp(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    attribute: str,
    out_path: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    n_iterations: int = 50,
    C: float = 0.001,
    tolerance: float = 0.0,
    per_region: bool = True,
    fit_split: str = "train",
    seed: int = 0,
    model: str | None = None,
) -> dict:
    """INLP-erase `attribute`: rounds of fit-linear-model / project-onto-its-nullspace, per region on
    `fit_split`, until the model is no better than chance on the fitted rows (excess ≤ `tolerance`) or after
    `n_iterations`. The accumulated projection is applied to every row about the train mean (the embedding's
    mean stays put). Writes `out_path` in the same schema.

    The classifier is strongly regularised (C = 0.001 on standardised features): with fewer rows than
    dimensions (240 × 384 on the demo) a C = 1 classifier separates the train rows along idiosyncratic
    directions, so 20 rounds left sex at 0.79-0.93 test balanced accuracy and cost up to 4.5 years of age MAE;
    at C = 0.001 each round removes the dominant sex direction and age is kept (demo neck: 2.40 → 2.48).
    """
    table = _load(embeddings, subjects, splits, images, attributes)
    spec = table.spec(attribute)
    raw = table.values(attribute)
    ok = present(raw)
    fit_rows = table.split_mask(fit_split) & ok
    X = table.X.astype(np.float64)
    out = table.X.copy()
    removed, rounds, skipped = {}, {}, []
    for region, rows in _regions(table, per_region):
        fit = rows & fit_rows
        y = raw[fit] if spec.is_categorical else raw[fit].astype(np.float64)
        if fit.sum() < 3 or (spec.is_categorical and len(set(y)) < 2) or (not spec.is_categorical and np.ptp(y) == 0):
            skipped.append(region)
            continue
        centre = X[fit].mean(0)
        basis = np.zeros((X.shape[1], 0))
        history = []
        for _ in range(n_iterations):
            Xp = X[fit] - centre
            Xp = Xp - (Xp @ basis) @ basis.T
            W, excess = _inlp_step(Xp, y, spec, C, seed)
            history.append(round(excess, 4))
            if excess <= tolerance:
                break
            W = W - (W @ basis) @ basis.T  # only what is new relative to the directions already removed
            if np.linalg.norm(W) == 0:
                break
            q, _ = np.linalg.qr(np.concatenate([basis, W.T], axis=1))
            basis = q[:, : basis.shape[1] + W.shape[0]]
            if basis.shape[1] >= X.shape[1] - 1:
                break
        Xr = X[rows] - centre
        out[rows] = (X[rows] - (Xr @ basis) @ basis.T).astype(np.float32)
        removed[region] = int(basis.shape[1])
        rounds[region] = history
    if skipped:
        log.warning("inlp %s: not erased in %s (fewer than two values on %s)", attribute, skipped, fit_split)
    mitigation = {"method": "inlp", "attributes": [attribute], "fit_split": fit_split, "per_region": per_region,
                  "C": C, "n_iterations": n_iterations, "removed_dimensions": removed,
                  "excess_over_chance_per_round": rounds, "not_erased": skipped}
    _write_like(embeddings, table.frame, out, out_path,
                _output_metadata(embeddings, out_path, out.shape[1], mitigation, model))
    return {"rows": int(out.shape[0]), "dim": int(out.shape[1]), **mitigation}


# ------------------------------------------------------------------------------------------- adversarial VAE

@threaded
def debias_adversarial_vae(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    protected: Sequence[str],
    out_path: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    config: Mapping | AdversarialVAEConfig | None = None,
    model_path: PathLike | None = None,
    log_path: PathLike | None = None,
    device: str | None = None,
    model: str | None = None,
    keep: Sequence[str] = (),
) -> dict:
    """Train the adversarial VAE against every attribute in `protected`, with task heads for every attribute in
    `keep` (paper 002: the clinical task stays decodable), train split, early stop on val, and
    write μ for every row to `out_path` (contract schema, dim = latent_dim). Accepts any input dimension
    (pca volumes, 1408-d CT foundation vectors). Optionally saves the model (`torch.load(weights_only=True)`)
    and the per-epoch history (`.csv` or Parquet by the file name)."""
    table = _load(embeddings, subjects, splits, images, attributes)
    adversaries = _head_targets(table, protected)
    tasks = _head_targets(table, keep)
    regions = table.frame["region"].to_numpy()
    region_names = sorted(set(regions.tolist()))
    strata = np.searchsorted(np.asarray(region_names, dtype=object), regions)
    fit = fit_adversarial_vae(table.X, adversaries, table.split_mask("train"), table.split_mask("val"), config,
                              strata=strata, device=device or select_device(), task_targets=tasks)
    return _write_avae(fit, table, embeddings, out_path, protected, keep, region_names, model_path, log_path, model)


def _head_targets(table: AnalysisTable, names: Sequence[str]) -> dict:
    """Attributes as the adversarial VAE's heads take them: class codes (-1 missing) or values (NaN missing)."""
    targets = {}
    for name in names:
        spec = table.spec(name)
        raw = table.values(name)
        ok = present(raw)
        if spec.is_categorical:
            seen = {v for v in raw[ok]}
            classes = [c for c in (spec.categories or ()) if c in seen] + sorted(seen - set(spec.categories or ()))
            lookup = {c: i for i, c in enumerate(classes)}
            targets[name] = ("classification", np.array([lookup[v] if v is not None else -1 for v in raw]))
        else:
            targets[name] = ("regression", np.where(ok, raw, np.nan))
    return targets


def _write_avae(fit, table, embeddings, out_path, protected, keep, region_names, model_path, log_path,
                model) -> dict:
    Z = fit.transform(table.X)
    mitigation = {"method": "avae", "attributes": list(protected), "kept": list(keep), "fit_split": "train",
                  "early_stop_split": "val",
                  "per_region": False, "strata": region_names, "best_epoch": fit.best_epoch,
                  "epochs": len(fit.history), "config": {k: v for k, v in fit.state()["config"].items()},
                  "input_dim": int(table.X.shape[1]), "device": fit.device}
    _write_like(embeddings, table.frame, Z, out_path,
                _output_metadata(embeddings, out_path, Z.shape[1], mitigation, model))
    if model_path is not None:
        with atomic_path(model_path, ".pt") as tmp:
            torch.save({**fit.state(), "strata": region_names}, tmp)
    if log_path is not None:
        history = pl.DataFrame(fit.history)
        if str(log_path).endswith(".csv"):
            with atomic_path(log_path, ".csv") as tmp:
                history.write_csv(tmp)
        else:
            write_parquet(history, log_path)
    return {"rows": int(Z.shape[0]), "dim": int(Z.shape[1]), **mitigation}


# ------------------------------------------------------------------------------------------- stage

def run_mitigation(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    out_dir: PathLike,
    reprobe_out: PathLike,
    *,
    protected: Sequence[str],
    targets: Sequence[str] = (),
    methods: Sequence[str] = ("leace", "inlp", "avae"),
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    inlp: Mapping | None = None,
    avae: Mapping | None = None,
    models_dir: PathLike | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Every method for one model: `{out_dir}/{model}-leace-{attr}/volumes.parquet` and `-inlp-{attr}` per
    protected attribute, `{out_dir}/{model}-avae/volumes.parquet` against all of them (its model.pt and
    train_log.csv in `{models_dir}/{model}-avae/`, default beside the embeddings), then reprobe.parquet.
    Returns the re-probe table."""
    src_model = read_parquet_metadata(embeddings).get("model", Path(embeddings).parent.name)
    out_dir = Path(out_dir)
    outputs = []
    for attribute in protected:
        if "leace" in methods:
            path = out_dir / f"{src_model}-leace-{attribute}" / "volumes.parquet"
            erase_leace(embeddings, subjects, splits, attribute, path, images=images, attributes=attributes,
                        threads=threads)
            outputs.append(path)
        if "inlp" in methods:
            path = out_dir / f"{src_model}-inlp-{attribute}" / "volumes.parquet"
            erase_inlp(embeddings, subjects, splits, attribute, path, images=images, attributes=attributes,
                       seed=seed, threads=threads, **dict(inlp or {}))
            outputs.append(path)
    if "avae" in methods and protected:
        path = out_dir / f"{src_model}-avae" / "volumes.parquet"
        model_dir = Path(models_dir) / f"{src_model}-avae" if models_dir is not None else path.parent
        debias_adversarial_vae(embeddings, subjects, splits, protected, path, images=images, attributes=attributes,
                               config=avae, model_path=model_dir / "model.pt", log_path=model_dir / "train_log.csv",
                               threads=threads, keep=targets)
        outputs.append(path)
    return reprobe(embeddings, outputs, subjects, splits, protected, targets, reprobe_out, images=images,
                   attributes=attributes, seed=seed, threads=threads)
