"""Out-of-fold class probabilities of a categorical attribute from the probe's own model (same settings, same
backends, same tuning): what cleanlab's label-issue search and the discordant-subgroup analysis of `discover`
need. Train rows get the decision of a model that did not see their subject (subject-grouped, stratified
k-fold); every other row that of the model fitted on all of train. Decisions become probabilities by a
multinomial logistic calibration fitted on the out-of-fold train decisions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from cohortlens.analysis.probe_backends import FeatureSpace, feature_space, grid_decisions
from cohortlens.analysis.probe_fit import fit_tuned, make_task, prepare_attribute
from cohortlens.analysis.probe_settings import ProbeSettings
from cohortlens.analysis.table import AnalysisTable, load_analysis_table, regions_of
from cohortlens.io.tables import read_parquet_metadata, write_parquet
from cohortlens.types import PathLike

OOF_SCHEMA = {
    "model": pl.Utf8, "region": pl.Utf8, "attribute": pl.Utf8, "image_uid": pl.Utf8, "subject_id": pl.Utf8,
    "split": pl.Utf8, "fold": pl.Int64, "label": pl.Utf8, "class": pl.Utf8, "proba": pl.Float64,
}


def out_of_fold_proba(
    table: AnalysisTable,
    attribute: str,
    settings: ProbeSettings | Mapping | None = None,
    *,
    n_folds: int = 5,
    space: FeatureSpace | None = None,
) -> pl.DataFrame:
    """Predicted class probabilities of a categorical attribute for every row with a recorded value:
    out-of-fold (subject-grouped, stratified k-fold) on the train split, from the model fitted on all of
    train elsewhere. Decision values are turned into probabilities by a multinomial logistic calibration
    fitted on the out-of-fold train decisions (as CalibratedClassifierCV does). What cleanlab's label-issue
    search and the discordant-subgroup analysis need.

    Returns a wide frame: image_uid, subject_id, region, attribute, split, fold (-1 outside train), label,
    then one Float64 probability column per class (in the attribute's category order).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold

    settings = ProbeSettings.from_config(settings)
    prep = prepare_attribute(table, attribute)
    if prep is None or prep.kind != "classification":
        raise ValueError(f"out_of_fold_proba needs a categorical attribute with ≥ 2 classes in train: {attribute!r}")
    if space is None:
        space = feature_space(table, settings)
    train = prep.rows["train"]
    others = np.flatnonzero((prep.codes >= 0) & ~np.isin(np.arange(table.frame.height), train))
    subjects = table.frame["subject_id"].to_numpy()
    n_folds = max(2, min(n_folds, int(np.bincount(prep.codes[train]).min())))
    folds = np.full(table.frame.height, -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=settings.seed)
    k = len(prep.classes)
    width = 1 if k == 2 else k
    D = np.zeros((table.frame.height, width))
    # hyperparameters tuned once (as for the probe), then reused for every fold
    C, g, _, (D_others,), _, _ = fit_tuned(table, space, prep, settings, [others])
    D[others] = D_others
    for f, (fit_idx, held_idx) in enumerate(splitter.split(train, prep.codes[train], subjects[train])):
        task, _, _ = make_task(prep, train[fit_idx], settings, np.random.default_rng(settings.seed + f),
                                settings.exact_max_train if space.backend == "exact" else None)
        D[train[held_idx]] = next(grid_decisions(space, task, [(C, g)], [train[held_idx]]))[2][0]
        folds[train[held_idx]] = f
    calibrator = LogisticRegression(C=100.0, max_iter=1000).fit(D[train], prep.codes[train])
    rows = np.sort(np.concatenate([train, others]))
    P = np.zeros((len(rows), k))
    P[:, calibrator.classes_] = calibrator.predict_proba(D[rows])
    keys = table.frame[rows].select("image_uid", "subject_id", "region")
    split = table.frame["split"].to_numpy()[rows] if "split" in table.frame.columns else np.full(len(rows), None)
    labels = np.asarray(prep.classes, dtype=object)[prep.codes[rows]]
    out = keys.with_columns(
        pl.lit(attribute).alias("attribute"), pl.Series("split", split, dtype=pl.Utf8),
        pl.Series("fold", folds[rows]), pl.Series("label", labels.tolist(), dtype=pl.Utf8),
        *[pl.Series(c, P[:, i]) for i, c in enumerate(prep.classes)],
    )
    return out


def oof_matrix(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(integer labels, probability matrix, class names) from an out_of_fold_proba frame, as cleanlab wants."""
    classes = frame.columns[frame.columns.index("label") + 1 :]
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[v] for v in frame["label"].to_list()], dtype=np.int64)
    return labels, frame.select(classes).to_numpy(), list(classes)


def write_out_of_fold(
    embeddings: PathLike,
    subjects: PathLike,
    splits: PathLike,
    out: PathLike,
    *,
    images: PathLike | None = None,
    attributes: Mapping | None = None,
    regions: Sequence[str] | None = None,
    roles: Sequence[str] = ("protected",),
    settings: ProbeSettings | Mapping | None = None,
    n_folds: int = 5,
) -> pl.DataFrame:
    """Out-of-fold probabilities of every categorical attribute with one of `roles`, per region, in long
    form (OOF_SCHEMA: one row per image × class) in one Parquet file; pivot back with `oof_wide`."""
    settings = ProbeSettings.from_config(settings)
    model = read_parquet_metadata(embeddings).get("model", Path(embeddings).parent.name)
    parts = []
    for region in (list(regions) if regions is not None else regions_of(embeddings)):
        table = load_analysis_table(embeddings, subjects, splits, images, region, attributes=attributes)
        space = feature_space(table, settings)
        for attribute, spec in table.specs.items():
            if spec.is_categorical and spec.role in roles and attribute in table.frame.columns:
                wide = out_of_fold_proba(table, attribute, settings, n_folds=n_folds, space=space)
                classes = wide.columns[wide.columns.index("label") + 1 :]
                parts.append(wide.unpivot(index=["image_uid", "subject_id", "split", "fold", "label"], on=classes,
                                          variable_name="class", value_name="proba")
                             .with_columns(pl.lit(model).alias("model"), pl.lit(region).alias("region"),
                                           pl.lit(attribute).alias("attribute")))
    long = pl.concat(parts).select(list(OOF_SCHEMA)).cast(OOF_SCHEMA) if parts else pl.DataFrame(schema=OOF_SCHEMA)
    write_parquet(long, out, metadata={"model": model, "settings": dataclasses.asdict(settings), "n_folds": n_folds})
    return long


def oof_wide(long: pl.DataFrame, region: str, attribute: str) -> pl.DataFrame:
    """One (region, attribute) of a write_out_of_fold file back in out_of_fold_proba's wide layout."""
    part = long.filter((pl.col("region") == region) & (pl.col("attribute") == attribute))
    classes = list(dict.fromkeys(part["class"].to_list()))
    wide = part.pivot(on="class", index=["image_uid", "subject_id", "region", "attribute", "split", "fold", "label"],
                      values="proba")
    return wide.select("image_uid", "subject_id", "region", "attribute", "split", "fold", "label", *classes)
