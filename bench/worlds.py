"""The detectors on confounded worlds they were not mended on: the confounded scenario at other data seeds.

The tests run the scenario at data seed 0, the world the detectors were developed on. This script runs the
workflow up to one model's findings in independent worlds (`demo.seed` = 1, 2, ...) and prints, per world,
the root causes found, false findings, unexplained echoes, folded echoes and echoes folded under an echo, with
the offending finding ids (`demo.truth.ground_truth_summary`). `--scenario null` runs the null scenario instead
(acquisition labels permuted across subjects): per world, the acquisition findings (site, date; there must be
none) and the false findings. `--date-calibration` also prints the level of
the within-stratum date test where the scenario renders no date effect: every batch, vendor and non-Hamburg
site cell of every region, Hamburg's images left out, dates permuted within site (a site cell freely); the
share of cells at p <= 0.05 and 0.01 should be near 5 % and 1 %. Results: docs/findings.md, Root causes.

    .venv/bin/python bench/worlds.py [--seeds 1-6] [--subjects 600] [--model pca] [--out runs/worlds]
                                     [--scenario confounded|null] [--date-calibration]

About 2 minutes per world for pca on 2 cores; a trained model adds its training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cohortlens.analysis.discover.conditional import stratum_labels
from cohortlens.analysis.discover.leaks import _run
from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.discover.stage import load_regions
from cohortlens.demo.truth import ground_truth_recall, ground_truth_summary

PROTOCOL_SITE = "Hamburg"  # the scenario's one dated change (demo.scenarios.confounded_effects)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def seeds_of(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def run_world(root: Path, seed: int, n_subjects: int, model: str, scenario: str = "confounded") -> dict:
    cfg = yaml.safe_load((REPO / f"config/scenarios/{scenario}.yaml").read_text())
    cfg["models"] = {model: cfg["models"][model]}
    cfg["demo"].update(n_subjects=n_subjects, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the target first: --configfile takes every following word as another config file
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), f"results/findings/{model}.parquet",
                           "--snakefile", str(REPO / "Snakefile"), "--directory", str(root), "--cores", "2",
                           "--configfile", str(root / "config.yaml")], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"world {seed}: the workflow failed\n{proc.stderr[-3000:]}")
    return cfg


def acquisition_findings(findings: Path) -> list[str]:
    """Findings of site or date (alone or as the first attribute of an interaction), folded ones included: none
    may be reported in a world whose acquisition labels were permuted across subjects (the null-world test of
    tests/test_scenario_findings.py)."""
    first = pl.col("attribute").str.split("×").list.first()
    return pl.read_parquet(findings).filter(first.is_in(["site", "date"]))["finding_id"].to_list()


def date_calibration(root: Path, cfg: dict, model: str) -> list[float]:
    discover_cfg = settings(cfg.get("discover", {}))
    r = root / "results"
    regions, _ = load_regions(r / f"embeddings/{model}/volumes.parquet", r / "cohort/subjects.parquet",
                              r / "cohort/images.parquet", r / "cohort/splits.parquet", cfg["attributes"],
                              discover_cfg)
    ps = []
    for rd in regions:
        site = stratum_labels(rd, "site")
        for attribute in ("batch", "vendor", "site"):
            labels = stratum_labels(rd, attribute)
            for value in sorted(set(labels) - {PROTOCOL_SITE}):
                keep = (site != PROTOCOL_SITE) & (labels == value)
                if keep.sum() < discover_cfg["interaction_min_site"]:
                    continue
                res = _run(rd, "date", discover_cfg, np.random.default_rng(1), keep=keep, conditional=False,
                           strata=None if attribute == "site" else site)
                if res is not None:
                    ps.append(float(res["p"]))
    return ps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-6", help="data seeds, e.g. 1-6 or 1,3,7")
    ap.add_argument("--subjects", type=int, default=600)
    ap.add_argument("--model", default="pca")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "worlds")
    ap.add_argument("--scenario", choices=("confounded", "null"), default="confounded")
    ap.add_argument("--date-calibration", action="store_true")
    args = ap.parse_args()
    if args.scenario == "null":
        print("world | acquisition findings | false findings | ids")
    else:
        print("world | found | false | unexplained | folded | under an echo | subgroup precision / recall | ids")
    all_ps: list[float] = []
    for seed in seeds_of(args.seeds):
        tag = "" if args.scenario == "confounded" else f"{args.scenario}-"
        root = args.out / f"{tag}{args.model}-{args.subjects}-seed{seed}"
        cfg = run_world(root, seed, args.subjects, args.model, args.scenario)
        findings = root / f"results/findings/{args.model}.parquet"
        s = ground_truth_summary(findings, root / f"data/{args.scenario}/ground_truth.json")
        if args.scenario == "null":
            acquisition = acquisition_findings(findings)
            print(f"{seed} | {len(acquisition)} | {s['false_findings']} | "
                  f"{json.dumps(acquisition + s['false_finding_ids'])}", flush=True)
            continue
        ids = s["false_finding_ids"] + s["unexplained_echo_ids"] + s["explained_by_non_root_ids"]
        sub = ground_truth_recall(findings, root / "data/confounded/ground_truth.json").filter(
            pl.col("effect") == "discordant_sex").row(0, named=True)
        print(f"{seed} | {s['found']}/{s['expected']} | {s['false_findings']} | {s['unexplained_echoes']} | "
              f"{s['folded']} | {len(s['explained_by_non_root_ids'])} | {_fmt(sub['precision'])} / "
              f"{_fmt(sub['recall'])} | {json.dumps(ids)}", flush=True)
        if args.date_calibration:
            all_ps += date_calibration(root, cfg, args.model)
    if all_ps:
        ps = np.array(all_ps)
        print(f"within-stratum date test, no rendered date effect: {len(ps)} cells, p <= 0.05: "
              f"{(ps <= 0.05).mean():.1%}, p <= 0.01: {(ps <= 0.01).mean():.1%}, smallest {ps.min():.3f}")


if __name__ == "__main__":
    main()
