"""The random streams of the synthetic cohorts.

Every random quantity comes from a SeedSequence keyed by (seed, subject index, stream) -- the same keys
``SeedSequence(seed).spawn(n)[i].spawn(...)`` would give -- so a subject's attributes and images depend only
on the seed and its index: not on the worker count, the chunking, or ``n_subjects``. The stream numbers
below the subject index are listed here, so that no two uses share one.
"""

from __future__ import annotations

import numpy as np

ATTR_STREAM = 0  # a demo subject's attributes (population.sample_subject)
REGION_STREAM = 1  # region r renders from stream REGION_STREAM + r (population.region_rng)
IDENT_STREAM = 4  # a subject's synthetic DICOM identifiers (dicom.py)
SCENARIO_ATTR_STREAM = 5  # a scenario subject's attributes (scenarios.py)
DICOM_PICK_ENTROPY = 0x44434D  # separate entropy word: never collides with a subject key
NULL_PERMUTATION_ENTROPY = 0x4E554C  # separate entropy word: never collides with a subject key


def seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=tuple(key))
