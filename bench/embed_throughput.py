"""Embedding throughput (slices/s) of each registered autoencoder's encoder at its poster preset (256 px),
through the real embedding stage (memory-mapped shards -> center crop -> encoder -> slices.parquet +
volumes.parquet), against the bare encoder on tensors already in memory, in the same run. Prints the device.

    python bench/embed_throughput.py [--preset nako] [--images 24] [--batch 256] [--threads 2] [--models vae dae]

The weights are freshly initialised (throughput does not depend on them). The ratio bare / stage is the cost
of loading model.pt, reading, cropping and writing around the encoder (and, for the DAE, the train z-score
rewrite). A model whose module is missing is reported and skipped.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import synthetic_cohort

from cohortlens.embed.autoencoder import embed_autoencoder, make_encoder
from cohortlens.models.modelfile import save_model
from cohortlens.models.registry import available_models, build_model, resolve_config
from cohortlens.preprocess.store import SliceStore
from cohortlens.runtime import seed_everything, select_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nako")
    ap.add_argument("--models", nargs="*", default=["vae", "dae"])
    ap.add_argument("--images", type=int, default=24, help="synthetic images of 16 slices")
    ap.add_argument("--batch", type=int, default=256, help="encoder minibatch (slices)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    device = select_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {args.threads}")
    torch.set_num_threads(args.threads)
    avail = available_models()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index, splits = synthetic_cohort(tmp / "cohort", n_images=args.images, canvas=256)
        store = SliceStore(index)
        n_slices = store.index.height
        for model_name in args.models:
            if avail.get(model_name):
                print(f"{model_name}: not available ({avail[model_name]}); skipped")
                continue
            cfg = resolve_config(model_name, {"preset": args.preset})
            seed_everything(0)
            model = build_model(model_name, cfg)
            save_model(tmp / model_name / "model.pt", model_name, model, None, cfg, "bench", 0, None)
            # bare encoder: the same slices, already cropped and in memory
            encode = make_encoder(model.to(device).eval(), int(cfg["crop"]), device, args.batch)
            slices = store.read(store.index)
            encode(slices[: args.batch])  # warm-up (cuDNN autotuning, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            encode(slices)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare = n_slices / (time.perf_counter() - t0)
            del slices
            t0 = time.perf_counter()
            embed_autoencoder(tmp / model_name / "model.pt", index, slices_path=tmp / model_name / "slices.parquet",
                              volumes_path=tmp / model_name / "volumes.parquet", splits_path=splits,
                              normalise=cfg.get("normalise"), batch_size=args.batch, threads=args.threads)
            stage = n_slices / (time.perf_counter() - t0)
            print(f"{model_name} [{args.preset}] {cfg['crop']}px, {model.embedding_dim}-d, {n_slices} slices: "
                  f"stage {stage:.3g} slices/s, bare encoder {bare:.3g} slices/s (stage overhead {bare / stage:.2f}x"
                  f"{', incl. train z-score pass' if cfg.get('normalise') else ''})", flush=True)


if __name__ == "__main__":
    main()
