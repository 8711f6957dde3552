"""The shared trainer of the autoencoders (β-VAE, diffusion autoencoder); the model side of the contract is
`cohortlens.models.protocol`.

What the trainer does
---------------------
- Data: the train split's slices (all, or the center slices) read from the memory-mapped shards by DataLoader
  worker processes. Batch `s` is a pure function of (seed, s): a seeded permutation per epoch and seeded random
  crops. Data order therefore survives a restart, does not depend on the worker count, and needs no state.
- Device: CUDA when present (bf16 autocast, channels_last, optional torch.compile), otherwise the CPU
  (`cohortlens.runtime.select_device`; torch and BLAS threads capped to the rule's `threads`).
- Checkpoints every `checkpoint_every` steps and when SIGTERM / SIGUSR1 arrives (SLURM preemption: the
  checkpoint is written, then `TrainingPreempted` is raised; `cohortlens train` and the workflow script exit with
  128 + signal so SLURM / Snakemake retries). A new start resumes from the newest checkpoint of the same
  fingerprint (model config + training rows): weights, optimizer, LR schedule, EMA, step, RNG states and the
  log so far. All files are written atomically.
- Log: `train_log.csv` (step, loss and its parts, lr, img_per_s, elapsed_s), progress lines (step, loss,
  img/s, ETA) in the job log (tqdm when attached to a terminal), TensorBoard when asked for and installed.
- EMA of all weights (torch.optim.swa_utils.AveragedModel) when `ema_decay` is set.
- Outputs: `model.pt` (weights, EMA weights, resolved config; `cohortlens.models.modelfile`), `train_log.csv`,
  `reconstructions.png`.

Modules
-------
- `settings`: `TrainSettings` (the trainer keys of a models.<name> entry) and the resume `fingerprint`;
- `data`: which slices train (`training_rows`, `qa_rows`) and the seeded batch stream (`SliceBatches`);
- `checkpoint`: checkpoint files, RNG state, the preemption signals (`TrainingPreempted`);
- `progress`: progress lines, `train_log.csv`, TensorBoard, the QA picture;
- `ema`: the EMA decay schedule;
- `loop`: `train`, the training loop;
- `stage`: `train_from_files`, the train stage of one model (what the workflow and `cohortlens train` run).

This file imports nothing: the config check reads `settings` from source without importing torch.
"""
