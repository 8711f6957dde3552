"""An independent check of a counterfactual strip: does the decoder's change look like the set to a classifier
that never saw the model?

A strip (`analysis.counterfactuals`) shows what the DAE's decoder does when z_sem moves along a finding's direction.
That the change is *large* or *where the effect lives* does not say it goes the right way: a decoder that barely
reads z_sem, or reads it for brightness, can change the right tissue in the wrong sense (measured on the demo:
docs/findings.md, counterfactual strips). The judge is a pixel-space classifier of set vs rest fitted on the real
images the direction was fitted on (the same region, slice and crop; never the strip's test images): scikit-learn's
PCA on the pixels, the recorded continuous traits beside the components (the direction is taken at equal traits, so
the judge is too), standardised, and a class-balanced logistic regression. Its coefficients on the components give
a logit per image; a strip agrees with the judge where the decode at the last σ scores higher than the decode at
the first. The change is reported as a *shift*: in units of the judge's gap between the set's and the rest's mean
logit on its own images, so 1 means the decode moved as far as a typical set image lies from a typical rest image.
The judge's own cross-validated balanced accuracy says how much its verdict is worth: near 0.5 the set is not
visible in the pixels of one slice to a linear classifier, and its verdict is noise. A judge just above chance has a
small gap, and dividing by it can make any change look large; so the judges of the cross-validation folds (each
fitted on 4/5 of the images) score the strip too, and a direction only counts where they all agree on it
(`fold_shifts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class StripJudge:
    """The fitted judge: the pixel PCA, the logit weight of each component at equal traits, the mean pixel logit of
    the set minus that of the rest (`gap`, > 0), and its cross-validated balanced accuracy on the images it was
    fitted on (`n_set` + `n_rest` of them). `folds`: the cross-validation's own judges (fitted on 4/5 of the
    images each), as judges of their own."""

    pca: PCA
    weights: np.ndarray
    gap: float
    balanced_accuracy: float
    n_set: int
    n_rest: int
    folds: tuple["StripJudge", ...] = ()

    def logit(self, images: np.ndarray) -> np.ndarray:
        """(n,) the judge's set-vs-rest logit of images (n, H, W), up to a constant (the traits held fixed)."""
        flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        return self.pca.transform(flat) @ self.weights

    def logit_change(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """(n,) logit(last) - logit(first) per image: > 0 where the change moves the image towards the set."""
        return self.logit(last) - self.logit(first)

    def shift(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """(n,) the logit change in units of `gap`: 1 = as far as the set's mean image from the rest's."""
        return self.logit_change(first, last) / self.gap

    def fold_shifts(self, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """(folds, n) the shift as each fold's judge scores it."""
        return np.stack([fold.shift(first, last) for fold in self.folds]) if self.folds else np.zeros((0, len(first)))


def _pipeline(n_pixels: int, n_components: int, seed: int) -> Pipeline:
    columns = ColumnTransformer([("pixels", PCA(n_components, random_state=seed), slice(0, n_pixels))],
                                remainder="passthrough")
    return Pipeline([("columns", columns), ("scale", StandardScaler()),
                     ("classify", LogisticRegression(class_weight="balanced", max_iter=5000))])


def fit_strip_judge(images: np.ndarray, in_set: np.ndarray, covariates: np.ndarray | None = None,
                    n_components: int = 32, folds: int = 5, seed: int = 0) -> StripJudge:
    """Fit the judge on images (n, H, W) with the set indicator (n,) and recorded traits (n, k) of the same images.

    The balanced accuracy is out of fold (stratified, `folds` folds, PCA refitted in each); one image per subject
    (one slice of one region per image), so the folds do not share subjects."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    y = np.asarray(in_set, dtype=bool)
    n_set, n_rest = int(y.sum()), int((~y).sum())
    if min(n_set, n_rest) < folds:
        raise ValueError(f"a strip judge needs {folds} images on each side (set {n_set}, rest {n_rest})")
    C = np.zeros((len(y), 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(len(y), -1)
    k = max(1, min(n_components, len(y) - len(y) // folds - 1, flat.shape[1]))
    X = np.hstack([flat, C])
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_validate(_pipeline(flat.shape[1], k, seed), X, y, cv=cv, scoring="balanced_accuracy",
                            return_estimator=True, return_indices=True)
    fold_judges = []
    for model, train in zip(scores["estimator"], scores["indices"]["train"]):
        try:
            fold_judges.append(_judge(model, flat[train], y[train], k, float("nan")))
        except ValueError:  # a fold whose logit does not separate its own images: no judge of its own
            continue
    return _judge(_pipeline(flat.shape[1], k, seed).fit(X, y), flat, y, k,
                  float(np.mean(scores["test_score"])), tuple(fold_judges))


def _judge(model: Pipeline, flat: np.ndarray, y: np.ndarray, k: int, accuracy: float,
           folds: tuple[StripJudge, ...] = ()) -> StripJudge:
    # the logistic's weights per standardised column; the first k columns are the components
    weights = model["classify"].coef_[0][:k] / model["scale"].scale_[:k]
    pca = model["columns"].named_transformers_["pixels"]
    logit = pca.transform(flat) @ weights
    gap = float(logit[y].mean() - logit[~y].mean())
    if not gap > 0:
        raise ValueError("a strip judge whose logit does not separate the set from the rest on its own images")
    return StripJudge(pca=pca, weights=weights, gap=gap, balanced_accuracy=accuracy, n_set=int(y.sum()),
                      n_rest=int((~y).sum()), folds=folds)


def judge_sample(in_set: np.ndarray, in_rest: np.ndarray, max_images: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Indices of at most `max_images` images to fit the judge on, up to half from each side (the larger side
    fills what the smaller one leaves), sorted."""
    sides = [np.flatnonzero(in_set), np.flatnonzero(in_rest & ~in_set)]
    half = max_images // 2
    take = [min(len(s), half) for s in sides]
    for i in (0, 1):
        take[i] = min(len(sides[i]), max_images - take[1 - i])
    return np.sort(np.concatenate([rng.choice(s, t, replace=False) for s, t in zip(sides, take)]).astype(int))
