"""`cohortlens` command line: thin entry points beside the Snakemake workflow."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cohortlens")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo-data", help="write the synthetic demo cohort (manifest, images, ground truth)")
    demo.add_argument("out_dir")
    demo.add_argument("--subjects", type=int, default=300)
    demo.add_argument("--size", type=int, default=64, help="in-plane voxels")
    demo.add_argument("--slices", type=int, default=16, help="sagittal slices per volume")
    demo.add_argument("--dicom-fraction", type=float, default=0.1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--scenario", choices=("demo", "confounded", "null"), default="demo",
                      help="demo: the demo cohort; confounded / null: the test cohorts of docs/demo-cohort.md "
                           "(they also write OUT/attributes.yaml)")
    sub.add_parser("chexpert-manifest", help="convert CheXpert train.csv into a manifest", add_help=False)
    if argv[:1] == ["chexpert-manifest"]:
        from cohortlens.io.chexpert import main as chexpert_main

        return chexpert_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo-data":
        from cohortlens.demo.generate import generate_demo_cohort

        summary = generate_demo_cohort(
            args.out_dir, n_subjects=args.subjects, size=args.size, n_slices=args.slices,
            dicom_fraction=args.dicom_fraction, seed=args.seed, workers=args.workers, scenario=args.scenario,
        )
        print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
