"""The unit of each attribute, for the report's tables, headlines and maps.

A config attribute may declare its `unit:` (e.g. `weight: {type: continuous, ..., unit: kg}`); without one,
`DEFAULT_UNITS` names the usual ones and a date's numbers are days (an MAE of a date, an onset's interval). A
categorical attribute has no unit. An MAE is in its attribute's unit.
"""

from __future__ import annotations

from typing import Mapping

DEFAULT_UNITS = {"age": "years", "weight": "kg", "height": "m"}
DATE_UNIT = "days"


def attribute_units(attributes: Mapping | None = None) -> dict[str, str]:
    """{attribute: unit} from a config `attributes:` mapping (or the one in subjects.parquet's metadata): the
    declared `unit`, else DEFAULT_UNITS by name, else 'days' for a date; categorical attributes and continuous
    ones without a known unit are left out. The default names are included even when not declared, so a
    table of an older run still gets them."""
    units = dict(DEFAULT_UNITS)
    for name, spec in (attributes or {}).items():
        spec = spec or {}
        if spec.get("unit"):
            units[name] = str(spec["unit"])
        elif spec.get("type") == "date":
            units[name] = DATE_UNIT
        elif spec.get("type") == "categorical":
            units.pop(name, None)
    if not attributes or "date" not in attributes:
        units.setdefault("date", DATE_UNIT)
    return units


def unit_of(attribute: str | None, units: Mapping[str, str] | None) -> str:
    """The unit of an attribute ('' if none); an interaction such as `site×date` has its date's unit."""
    if not attribute:
        return ""
    units = attribute_units() if units is None else units
    return units.get(attribute, "") or units.get(str(attribute).split("×")[-1], "")


def with_unit(label: str, unit: str) -> str:
    """'age MAE' + 'years' -> 'age MAE (years)'; a label without a unit stays as it is."""
    return f"{label} ({unit})" if unit else label


def column_with_unit(label: str, unit: str) -> str:
    """A column label that ends in a direction arrow keeps it last: 'age MAE ↓' -> 'age MAE (years) ↓'."""
    if not unit:
        return label
    if label.endswith(("↑", "↓")):
        return f"{label[:-1].rstrip()} ({unit}) {label[-1]}"
    return with_unit(label, unit)


# metrics whose value is in the unit of the attribute they are computed on (an error, a difference of errors)
UNIT_METRICS = ("mae", "mean_error", "mae_difference", "mean_error_difference")


def with_unit_column(frame, attribute: str, metric: str, units: Mapping[str, str] | None, after: str | None = None):
    """A polars frame with a `unit` column: the unit of `attribute`'s value for rows whose `metric` is an error
    in that unit (UNIT_METRICS), else empty; placed after column `after` (default: `metric`)."""
    import polars as pl

    if attribute not in frame.columns or metric not in frame.columns or "unit" in frame.columns:
        return frame
    lookup = {a: unit_of(a, units) for a in frame[attribute].drop_nulls().unique().to_list()}
    unit = pl.when(pl.col(metric).is_in(list(UNIT_METRICS))).then(
        pl.col(attribute).replace_strict(lookup, default="", return_dtype=pl.Utf8)).otherwise(pl.lit(""))
    out = frame.with_columns(unit.fill_null("").alias("unit"))
    cols = [c for c in frame.columns]
    cols.insert(cols.index(after or metric) + 1, "unit")
    return out.select(cols)


def groups_with_unit(frame, attribute: str, columns, units: Mapping[str, str] | None):
    """Group labels of a binned continuous attribute with its unit: '< 34.3' -> '< 34.3 years' (labels that
    start with a comparison or a bracket, i.e. bins; category names stay as they are)."""
    import polars as pl

    if attribute not in frame.columns:
        return frame
    lookup = {a: unit_of(a, units) for a in frame[attribute].drop_nulls().unique().to_list()}
    lookup = {a: u for a, u in lookup.items() if u}
    if not lookup:
        return frame
    exprs = []
    for c in columns:
        if c not in frame.columns or frame.schema[c] != pl.Utf8:
            continue
        unit = pl.col(attribute).replace_strict(lookup, default=None, return_dtype=pl.Utf8)
        is_bin = pl.col(c).str.contains(r"^(<|>|≥|≤|\[|\()")
        exprs.append(pl.when(unit.is_not_null() & is_bin).then(pl.col(c) + " " + unit).otherwise(pl.col(c)).alias(c))
    return frame.with_columns(exprs) if exprs else frame
