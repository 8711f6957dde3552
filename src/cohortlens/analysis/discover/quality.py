"""Data-quality findings from cleanlab's Datalab, per region.

What is cleanlab's and what is ours:

* cleanlab (`Datalab.find_issues`): the label-issue search (confident learning on out-of-fold class
  probabilities) and the outlier and near-duplicate detection (kNN distances in the feature space we pass),
  with cleanlab's default thresholds. The drift along the date (cleanlab's non-IID statistic with a
  permutation p-value) is `drift`.
* ours: the inputs and the reading. Features are the region's reduced embedding (standardised, leading PCA
  components). Class probabilities come from the probe stage's `out_of_fold_proba` (its RBF-kernel probe,
  subject-grouped folds, calibrated), so a label issue is "the recorded diagnosis disagrees with what the
  image embedding says". Only categorical attributes with role `target` are searched. For a protected
  attribute the images whose embedding looks like the other sex are people who differ from their sex's
  majority, not mislabelled ones (paper 003 checked its subgroup: the recorded sex was right); naming them
  label errors would invite "correcting" a protected attribute to fit the model. They are the
  discordant-subgroup finding (`subgroups`), which reports the same images without calling their
  labels wrong. Each flagged set becomes one finding per region (and attribute): cleanlab gives scores and flags, not p-values, so those findings have no p-value.
"""

from __future__ import annotations

import logging

import numpy as np

from cohortlens.analysis.discover.core import Finding, RegionData
from cohortlens.analysis.table import AnalysisTable

log = logging.getLogger(__name__)

# Roles whose recorded categories can be wrong labels: annotations of a target, not who a person is.
LABEL_ISSUE_ROLES = ("target",)
ISSUES = {"outlier": "outliers of the embedding (isolated from their nearest neighbours)",
          "near_duplicate": "near-duplicates (almost identical embeddings)"}


def _datalab(data: dict, label_name: str | None = None):
    from cleanlab import Datalab

    return Datalab(data=data, label_name=label_name, verbosity=0)


def data_quality(rd: RegionData, cfg: dict, rng: np.random.Generator) -> list[Finding]:
    out: list[Finding] = []
    if rd.n < 20:
        return out
    out += feature_issues(rd, cfg)
    for attribute in rd.attributes(roles=LABEL_ISSUE_ROLES, types=("categorical",)):
        f = label_issues(rd, attribute, cfg)
        if f is not None:
            out.append(f)
    return out


def feature_issues(rd: RegionData, cfg: dict) -> list[Finding]:
    features = np.ascontiguousarray(rd.Zc, dtype=np.float32)
    lab = _datalab({"row": np.arange(rd.n)})
    lab.find_issues(features=features, issue_types={"outlier": {}, "near_duplicate": {}})
    issues = lab.get_issues()
    uids = rd.image_uids
    out = []
    for kind, what in ISSUES.items():
        col = f"is_{kind}_issue"
        if col not in issues.columns:
            continue
        flagged = issues[col].to_numpy(bool)
        if not flagged.any():
            continue
        scores = issues[f"{kind}_score"].to_numpy()
        ids = uids[flagged].tolist()
        details = {"scores": dict(zip(ids, np.round(scores[flagged], 4).tolist())), "source": "cleanlab Datalab"}
        if kind == "near_duplicate":
            sets = lab.get_info("near_duplicate").get("near_duplicate_sets")
            if sets is not None:
                details["sets"] = {uids[i]: [uids[j] for j in s] for i, s in enumerate(sets) if len(s)}
        shown = ", ".join(ids[:5]) + (", …" if len(ids) > 5 else "")
        summary = f"cleanlab flags {len(ids)} of {rd.n} {rd.region} images as {what}: {shown}"
        f = Finding(kind, rd.region, "embedding", None, len(ids) / rd.n, "fraction_flagged", None, rd.n, ids,
                    summary, details)
        f.flagged = True
        out.append(f)
    return out


def label_issues(rd: RegionData, attribute: str, cfg: dict) -> Finding | None:
    """cleanlab's label issues of a recorded category against the probe stage's out-of-fold probabilities."""
    from cohortlens.analysis.out_of_fold import oof_matrix, out_of_fold_proba

    if rd.X is None or "split" not in rd.frame.columns:
        log.warning("label issues of %s in %s skipped: they need the embedding and the split", attribute, rd.region)
        return None
    table = AnalysisTable(frame=rd.frame, X=rd.X, specs=rd.specs, model=rd.model)
    try:
        oof = out_of_fold_proba(table, attribute, {"seed": cfg["seed"]}, n_folds=cfg["folds"])
    except ValueError as exc:
        log.warning("label issues of %s in %s skipped: %s", attribute, rd.region, exc)
        return None
    labels, proba, classes = oof_matrix(oof)
    lab = _datalab({attribute: labels}, label_name=attribute)
    lab.find_issues(pred_probs=proba, issue_types={"label": {}})
    issues = lab.get_issues()
    flagged = issues["is_label_issue"].to_numpy(bool)
    if not flagged.any():
        return None
    uids = np.asarray(oof["image_uid"].to_list(), dtype=object)
    predicted = np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
    recorded = np.asarray(classes, dtype=object)[labels]
    ids = uids[flagged].tolist()
    swaps = {}
    for r, p in zip(recorded[flagged], predicted[flagged]):
        swaps[f"{r}->{p}"] = swaps.get(f"{r}->{p}", 0) + 1
    summary = (f"cleanlab flags {len(ids)} of {len(uids)} {rd.region} images whose recorded {attribute} "
               f"disagrees with the embedding (out-of-fold kernel-probe probabilities): "
               + ", ".join(f"recorded {k.split('->')[0]} but looks {k.split('->')[1]}: {v}"
                           for k, v in sorted(swaps.items())))
    details = {"source": "cleanlab Datalab label issues", "probabilities": "probe.out_of_fold_proba",
               "swaps": swaps, "label_quality": dict(zip(ids, np.round(issues["label_score"].to_numpy()[flagged],
                                                                        4).tolist()))}
    f = Finding("label_issue", rd.region, attribute, None, len(ids) / len(uids), "fraction_flagged", None,
                len(uids), ids, summary, details)
    f.flagged = True
    return f
