"""How an echo is recorded on its finding: `explained_by` (the column of findings.parquet), the evidence in
`details.explained_by` and the sentence appended to the summary that the report shows folded under the cause."""

from __future__ import annotations

from cohortlens.analysis.discover.core import INTERACTION_SEP, Finding

EXPLAINED = " — explained by "  # starts the sentence `mark` appends to the summary


def is_interaction(f: Finding) -> bool:
    return INTERACTION_SEP in f.attribute


def mark(f: Finding, cause: str, value: str | None, test: str, p_cond: float, p_reverse: float | None,
         inseparable: bool = False, jointly_with: str | None = None, below_floor: float | None = None) -> None:
    """`below_floor`: the effect left given the cause, when it is significant but below the detector's relevance
    floor (the floor that decides whether a test is a finding at all)."""
    f.explained_by = f"{cause}={value}" if value is not None else cause
    f.details["explained_by"] = {"attribute": cause, "value": value, "p_marginal": f.p_value,
                                 "p_conditional": p_cond, "p_reverse": p_reverse, "test": test,
                                 "inseparable": inseparable}
    if below_floor is not None:
        f.details["explained_by"]["effect_left"] = below_floor
    shown = f"{cause} {value}" if value is not None else cause
    if jointly_with:
        f.details["jointly_with"] = jointly_with
        together = "both" if ", " not in jointly_with else "all of them"
        f.summary += f"{EXPLAINED}{shown} together with {jointly_with}: given {together} p = {p_cond:.2g}"
        return
    f.summary += (f"{EXPLAINED}{shown}: given {cause} p = {p_cond:.2g}"
                  + (f", what is left (R² {below_floor:.3f}) is below the relevance floor"
                     if below_floor is not None else "")
                  + (" (the two cannot be separated in this cohort)" if inseparable else ""))


def unmark(f: Finding) -> None:
    """Undo `mark` (before the finding is marked again under another cause)."""
    f.summary = f.summary.rpartition(EXPLAINED)[0] or f.summary
    f.explained_by = None
    for key in ("explained_by", "jointly_with"):
        f.details.pop(key, None)
