"""The strip judge (`cohortlens.analysis.strip_judge`): a pixel classifier of set vs rest that scores whether a
counterfactual strip moves its images towards the set, in worlds where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from cohortlens.analysis.strip_judge import fit_strip_judge, judge_sample

SIZE = 24


def pattern(cy: int, cx: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)


SET_MARK, OTHER_MARK, BODY = pattern(6, 6), pattern(17, 17), np.ones((SIZE, SIZE))


def world(n: int, seed: int, mark: float = 0.8, trait_effect: float = 0.0):
    """n images of noise with SET_MARK (strength `mark`) on the set; a recorded trait, higher in the set, brightens
    the whole image by trait_effect per unit, plus as much again that the trait does not explain (men are taller,
    taller bodies are bigger, and bodies vary beyond their height)."""
    rng = np.random.default_rng(seed)
    in_set = rng.random(n) < 0.4
    trait = rng.normal(size=n) + 1.0 * in_set
    body = trait + rng.normal(size=n)
    images = rng.normal(scale=0.5, size=(n, SIZE, SIZE))
    images += mark * in_set[:, None, None] * SET_MARK + trait_effect * body[:, None, None] * BODY
    return images, in_set, trait


def test_a_change_towards_the_set_scores_one_gap_away_and_unrelated_changes_nothing():
    images, in_set, trait = world(400, seed=0)
    judge = fit_strip_judge(images, in_set, trait[:, None])
    assert judge.balanced_accuracy > 0.9
    assert (judge.n_set, judge.n_rest) == (in_set.sum(), (~in_set).sum())
    rest = images[~in_set][:20]
    # adding the set's own mark moves a rest image as far as the set's mean image lies from the rest's
    towards = judge.shift(rest, rest + 0.8 * SET_MARK)
    assert np.all(towards > 0) and abs(np.median(towards) - 1.0) < 0.35
    np.testing.assert_allclose(judge.shift(rest + 0.8 * SET_MARK, rest), -towards)  # the way back
    # a change elsewhere is not the set's
    assert np.abs(np.median(judge.shift(rest, rest + 0.8 * OTHER_MARK))) < 0.15
    np.testing.assert_allclose(judge.logit_change(rest, rest), 0.0, atol=1e-9)


def test_labels_that_mean_nothing_give_a_judge_at_chance():
    images, in_set, trait = world(400, seed=1)
    shuffled = np.random.default_rng(2).permutation(in_set)
    judge = fit_strip_judge(images, shuffled, trait[:, None])
    assert judge.balanced_accuracy < 0.62  # 0.5 ± noise of 400 images


@pytest.mark.slow  # 8 judges, ~30 s
def test_at_equal_traits_the_judge_does_not_credit_what_the_trait_does():
    # the set's trait is higher and the trait brightens the whole body: without the trait the judge learns part of
    # the brightening as "set", with it mostly the set's own mark (four worlds; one is noisy)
    plain_shifts, adjusted_shifts = [], []
    for seed in range(4):
        images, in_set, trait = world(600, seed=seed, mark=0.3, trait_effect=1.0)
        rest = images[~in_set][:20]
        brighter = rest + 1.0 * BODY  # one trait unit more, nothing of the set's own effect
        plain = np.median(fit_strip_judge(images, in_set).shift(rest, brighter))
        adjusted_judge = fit_strip_judge(images, in_set, trait[:, None])
        adjusted = np.median(adjusted_judge.shift(rest, brighter))
        assert adjusted < plain
        assert np.median(adjusted_judge.shift(rest, rest + 0.3 * SET_MARK)) > 0.3  # the set's own mark still counts
        plain_shifts.append(plain)
        adjusted_shifts.append(abs(adjusted))
    print("brightening: plain", np.round(plain_shifts, 2), "adjusted", np.round(adjusted_shifts, 2))
    assert np.mean(plain_shifts) > 0.15
    assert np.mean(adjusted_shifts) < 0.5 * np.mean(plain_shifts)


def test_too_few_images_on_a_side_is_an_error():
    images, in_set, _ = world(60, seed=4)
    few = np.zeros(60, bool)
    few[:3] = True
    with pytest.raises(ValueError, match="5 images on each side"):
        fit_strip_judge(images, few)


def test_the_sample_takes_half_from_each_side_and_fills_from_the_larger():
    rng = np.random.default_rng(0)
    in_set = np.arange(100) < 10
    rows = judge_sample(in_set, ~in_set, 40, rng)
    assert len(rows) == 40 and in_set[rows].sum() == 10  # the set has 10: the rest fills the other 30
    rows = judge_sample(np.arange(100) < 50, np.arange(100) >= 50, 40, rng)
    assert (rows < 50).sum() == 20 and (rows >= 50).sum() == 20 and np.all(np.diff(rows) > 0)
    # a restricted rest (a site's other images) and images in neither side are never drawn
    in_rest = (np.arange(100) >= 80)
    rows = judge_sample(np.arange(100) < 10, in_rest, 1000, rng)
    assert sorted(rows.tolist()) == [*range(10), *range(80, 100)]


def test_fold_judges_agree_on_the_set_and_not_on_noise_seen_by_a_judge_at_chance():
    # A judge near chance has a small gap, so an unrelated change can come out as a large shift; its cross-validation
    # folds' judges then disagree on the sign more often than not. A good judge's folds agree on the set's own mark.
    images, in_set, trait = world(400, seed=1)
    weak = fit_strip_judge(images, np.random.default_rng(2).permutation(in_set), trait[:, None])
    strong = fit_strip_judge(images, in_set, trait[:, None])
    assert len(weak.folds) == len(strong.folds) == 5
    rest, rng = images[~in_set][:8], np.random.default_rng(5)
    large, agreed = 0, 0
    for _ in range(20):
        changed = rest + rng.normal(scale=0.5, size=(SIZE, SIZE))
        median = np.median(weak.shift(rest, changed))
        folds = np.median(weak.fold_shifts(rest, changed), axis=1)
        large += abs(median) >= 0.1
        agreed += bool(np.all((folds > 0) == (median > 0)))
    print("weak judge, 20 noise changes: |median| >= 0.1 in", large, "all folds agree in", agreed)
    assert large >= 10  # the inflation the folds guard against is there
    assert agreed <= 8  # 5 independent signs would agree 6 % of the time; the folds share 3/4 of their images
    towards = np.median(strong.fold_shifts(rest, rest + 0.8 * SET_MARK), axis=1)
    np.testing.assert_allclose(towards, np.median(strong.shift(rest, rest + 0.8 * SET_MARK)), atol=0.15)
