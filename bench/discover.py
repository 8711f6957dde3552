"""The discover stage's cost as a region grows: does it finish at a NAKO-sized region?

discover analyses up to `max_region_images` (20 000) images per region; config/nako.yaml gives the SLURM job
480 minutes. This script writes embedding cohorts in the contract schema (volumes.parquet, subjects.parquet with
the confounded scenario's attributes, splits.parquet) at several sizes, one region each, with planted structure
of the kinds discover looks for (a sex and an age signal, one site's shifted look, one vendor's shift, one site's
step from a date, a 4 % opposite-sex subgroup), runs `load_regions` + `run_tests` on each and prints the time of
every detector (the stage's own log lines) and the ratio of each size's time to the smallest size's, measured in
the same run. A ratio near the size ratio is linear; the exponent column is log(ratio) / log(size ratio).

    .venv/bin/python bench/discover.py [--sizes 1000,4000] [--dim 64] [--threads 2]

About 1 minute at 1000 images and 4 at 4000 on 2 cores. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cohortlens.analysis.discover.settings import settings
from cohortlens.analysis.discover.stage import load_regions, run_tests
from cohortlens.demo.population import SITES
from cohortlens.demo.scenarios import BATCHES, CONFOUNDED_DESIGN, confounded_effects
from cohortlens.embed.parquet import VOLUME_KEYS, EmbeddingWriter
from cohortlens.io.tables import write_parquet

START, DAYS = dt.date(2014, 1, 1), 4 * 365
CHANGE = dt.date.fromisoformat(confounded_effects()["site_protocol_change"]["from_date"])  # Hamburg's protocol


def write_cohort(root: Path, n: int, dim: int, seed: int) -> tuple[Path, Path, Path, dict]:
    """One region ("lumbar") of n subjects; returns (volumes, subjects, splits, attribute specs)."""
    rng = np.random.default_rng(seed)
    site = rng.choice(SITES, n)
    vendor = np.where(rng.random(n) < np.vectorize(CONFOUNDED_DESIGN["vendor_x_share"].get)(site), "X", "Y")
    days = rng.integers(0, DAYS, n)
    date = [START + dt.timedelta(days=int(d)) for d in days]
    batch = np.where(rng.random(n) < CONFOUNDED_DESIGN["batch_follows_date"],
                     np.array(BATCHES)[np.minimum(days * len(BATCHES) // DAYS, len(BATCHES) - 1)],
                     rng.choice(BATCHES, n))
    sex = rng.choice(["F", "M"], n)
    age = rng.uniform(20, 80, n) + 5 * (site == "Neubrandenburg")
    height = np.where(sex == "M", 1.78, 1.65) + rng.normal(0, 0.07, n)
    weight = 25 * height ** 2 + rng.normal(0, 9, n)
    looks_male = (sex == "M") ^ (rng.random(n) < 0.04)

    Z = rng.normal(size=(n, dim))
    Z[:, 0:4] += 1.5 * looks_male[:, None]
    Z[:, 4:8] += ((age - 50) / 15)[:, None]
    Z[:, 8] += 2.0 * (height - 1.7) / 0.1
    Z[:, 9:12] += 3.0 * (site == "Essen")[:, None]
    Z[:, 12:14] += 1.0 * (vendor == "Y")[:, None]
    Z[:, 14:16] += 1.5 * ((site == "Hamburg") & (np.array(date) >= CHANGE))[:, None]

    subjects = [f"B{i:06d}" for i in range(n)]
    frame = pl.DataFrame({"image_uid": [f"{s}/lumbar" for s in subjects], "subject_id": subjects,
                          "region": ["lumbar"] * n})
    volumes = root / "bench/volumes.parquet"
    with EmbeddingWriter(volumes, VOLUME_KEYS, dim, {"model": "bench", "dim": dim, "level": "volume"}) as w:
        w.write(frame, Z.astype(np.float32))
    attributes = yaml.safe_load((REPO / "config/scenarios/confounded.yaml").read_text())["attributes"]
    table = pl.DataFrame({"subject_id": subjects, "sex": sex.tolist(), "age": age, "height": height,
                          "weight": weight, "site": site.tolist(), "vendor": vendor.tolist(),
                          "batch": batch.tolist(), "date": [d.isoformat() for d in date]})
    write_parquet(table, root / "subjects.parquet", metadata={"attributes": attributes})
    split = np.where(np.arange(n) % 20 < 16, "train", np.where(np.arange(n) % 20 < 17, "val", "test"))
    write_parquet(pl.DataFrame({"subject_id": subjects, "split": split.tolist()}), root / "splits.parquet")
    return volumes, root / "subjects.parquet", root / "splits.parquet", attributes


class StageTimes(logging.Handler):
    """Collects the stage's "discover <region> <detector>: 1.2s" and "discover <step>: 1.2s" log lines."""

    PATTERN = re.compile(r"^discover (?:(?:neck|chest|lumbar) )?(.+?)(?: \(.*\))?: ([0-9.]+)s$")

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: dict[str, float] = defaultdict(float)

    def emit(self, record):
        m = self.PATTERN.match(record.getMessage())
        if m:
            self.times[m.group(1)] += float(m.group(2))


def run(n: int, dim: int, threads: int, seed: int) -> tuple[dict, list[str]]:
    """(seconds per step of the stage, the ids of its findings) of one cohort of n images."""
    with tempfile.TemporaryDirectory() as tmp:
        volumes, subjects, splits, attributes = write_cohort(Path(tmp), n, dim, seed)
        cfg = {"seed": 0, "blas_threads": threads}
        handler = StageTimes()
        log = logging.getLogger("cohortlens")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            t0 = time.perf_counter()
            regions, _ = load_regions(volumes, subjects, None, splits, attributes, cfg)
            findings = run_tests(regions, cfg)
            handler.times["total"] = time.perf_counter() - t0
        finally:
            log.removeHandler(handler)
        alpha = settings(cfg)["alpha"]
        return dict(handler.times), [f.finding_id for f in findings if f.is_finding(alpha)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,4000", help="images per region, smallest first (the baseline)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        times, found = run(n, args.dim, args.threads, args.seed)
        results[n] = times
        print(f"n={n}: {times['total']:.1f} s, {len(found)} findings", flush=True)
    base = sizes[0]
    steps = sorted({k for t in results.values() for k in t}, key=lambda k: -results[sizes[-1]].get(k, 0.0))
    print("\nstep | " + " | ".join(f"{n} (s)" for n in sizes) + " | " +
          " | ".join(f"ratio {n}/{base} (exponent)" for n in sizes[1:]))
    for k in steps:
        cells = [f"{results[n].get(k, 0.0):.1f}" for n in sizes]
        ratios = []
        for n in sizes[1:]:
            a, b = results[base].get(k, 0.0), results[n].get(k, 0.0)
            ratios.append(f"{b / a:.1f} ({np.log(b / a) / np.log(n / base):.2f})" if a > 0.05 and b > 0 else "—")
        print(f"{k} | " + " | ".join(cells) + " | " + " | ".join(ratios))


if __name__ == "__main__":
    main()
