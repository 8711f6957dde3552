"""A cluster's date comparison within a stratum is gated by that stratum's within-stratum date leak
(`core._gate_by_the_stratum_leak`, applied by `adjust`): it is a finding only where the leak is one."""

from __future__ import annotations

from cohortlens.analysis.discover.core import WITHIN_FAMILY, Finding, adjust

ALPHA = 0.05


def _leak(value: str, p: float) -> Finding:
    return Finding("attribute_leak", "neck", "site×date", value, 0.2, "r2", p, 150, [], f"within site {value}",
                   {"stratum": "site", "site": value}, tag="within", family=WITHIN_FAMILY)


def _comparison(value: str, p: float) -> Finding:
    return Finding("cluster", "neck", "site×date", f"{value}, before 2015-09-04", -0.3, "rank_biserial", p, 176, [],
                   f"site {value} images in density cluster 0", {"stratum": "site", "site": value,
                                                                 "test": "mann_whitney_u"}, tag="cluster0")


def test_a_cluster_date_comparison_stands_only_where_the_stratum_leak_does():
    # BH over 20 leaks: site E's at p 0.6 is no date effect within E; site H's at p 0.001 is one
    leaks = [_leak("E", 0.6), _leak("H", 0.001)] + [_leak(f"S{k}", 0.5) for k in range(18)]
    in_e, in_h, in_small = _comparison("E", 0.002), _comparison("H", 0.002), _comparison("Small", 0.002)
    # strong cluster enrichments in the same BH family, as in a real run (they lift BH's threshold)
    strong = [Finding("cluster", "neck", "site", "H", 3.0, "enrichment_ratio", 1e-30, 60, [], "cluster", {})
              for _ in range(5)]
    tests = leaks + [in_e, in_h, in_small] + strong
    adjust(tests)
    assert in_e.details["gate"]["p_adjusted_own"] < ALPHA  # significant on its own ...
    assert in_e.p_adjusted == leaks[0].p_adjusted and not in_e.is_finding(ALPHA)  # ... not past the gate
    assert in_h.is_finding(ALPHA) and in_h.p_adjusted == max(leaks[1].p_adjusted, in_h.details["gate"]["p_adjusted_own"])
    # a stratum too small for a leak test of its own keeps the comparison's own p
    assert "gate" not in in_small.details and in_small.is_finding(ALPHA)
