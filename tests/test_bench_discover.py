"""bench/discover.py (the discover stage's cost as a region grows) at a size that takes seconds, so it cannot rot:
its cohort must give the stage real work (the planted sex, age and site effects found), and every step the stage
logs must reach the timing table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "discover.py"


@pytest.mark.slow
def test_the_discover_bench_times_every_step_of_a_cohort_with_planted_effects():
    spec = importlib.util.spec_from_file_location("bench_discover", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times, found = bench.run(400, 32, 1, 0)
    assert {"leaks", "clusters", "root causes", "discordant subgroups", "drift", "total"} <= set(times)
    assert times["total"] >= times["root causes"] + times["leaks"] > 0
    for planted in ("attribute_leak-lumbar-sex-", "attribute_leak-lumbar-age", "attribute_leak-lumbar-site-essen"):
        assert any(i.startswith(planted) for i in found), planted
