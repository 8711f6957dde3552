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
    train = sub.add_parser("train", help="train one autoencoder (vae | dae) outside the workflow; resumes from its "
                                         "checkpoints, exits 128 + signal after a SIGTERM / SIGUSR1 checkpoint")
    train.add_argument("model")
    train.add_argument("--config", help="YAML/JSON file with the models.<name> entry (default: the preset 'demo')")
    train.add_argument("--index", required=True)
    train.add_argument("--splits", required=True)
    train.add_argument("--out", required=True, help="output folder (model.pt, train_log.csv, reconstructions.png)")
    train.add_argument("--threads", type=int, default=1)
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
    elif args.command == "train":
        return _train(args)
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import yaml

    from cohortlens.models.training.checkpoint import TrainingPreempted
    from cohortlens.models.training.stage import train_from_files

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = yaml.safe_load(Path(args.config).read_text()) if args.config else {"preset": "demo"}
    try:
        train_from_files(args.model, cfg, args.index, args.splits, model_path=Path(args.out) / "model.pt",
                         threads=args.threads)
    except TrainingPreempted as stop:
        logging.getLogger("cohortlens.models.training").warning("%s", stop)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
