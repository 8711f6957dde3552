"""Logging for Snakemake script jobs: everything (warnings, tracebacks) goes to the rule's log file."""

from __future__ import annotations

import logging
import sys


def to_rule_log(snakemake) -> logging.Logger:
    path = snakemake.log[0] if snakemake.log else None
    if path:
        stream = open(path, "w", buffering=1)
        sys.stderr = stream
        sys.stdout = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    return logging.getLogger(f"cohortlens.{snakemake.rule}")
