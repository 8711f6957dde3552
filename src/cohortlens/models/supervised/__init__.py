"""The supervised image engine: MONAI classification / regression networks trained on the preprocessed slices.

One engine for every experiment that trains a network on the images themselves: the supervised baselines of paper
003's Table 1 (`cohortlens.analysis.baselines`), the set-vs-rest classifier with GradCAM saliency per finding
(`cohortlens.analysis.saliency`; `gradcam` on the layer `networks.GRADCAM_LAYERS` names) and the classifier whose
accuracy is followed per epoch for a flagged subject group (`cohortlens.analysis.subgroup_curves`; `loop.EpochEnd`:
a callback after every epoch may score any rows and log what it returns).

What it does
------------
- Networks (`networks`): MONAI's ResNet10 / ResNet34 / DenseNet121, 2-D, one input channel, one output block per
  head; `width` scales the channels (1 = as published), the depth is always the named architecture's.
- Data (`data`): labelled slices read from the memory-mapped shards (the autoencoders' `ShardReader` and seeded
  data order: batch s = f(seed, s)); a fixed center crop (the paper's fixed field of view), in training
  optionally shifted by up to `jitter` px. Targets and per-row loss weights come from the caller (the balancing is
  the caller's: `analysis.balance`), several heads at once (missing target: weight 0).
- Training (`loop`): AdamW, warm-up + constant/cosine LR, bf16 autocast on CUDA, channels_last, checkpoints every
  `checkpoint_every` steps, at every epoch end and on SIGTERM / SIGUSR1 (`training.checkpoint`: the same files,
  fingerprints, RNG state and `TrainingPreempted` as the autoencoders), automatic resume, progress lines and a log
  (`training.progress`), a callback after every epoch.
- Prediction (`loop.predict`, `loop.volume_means`): outputs per slice, and per volume as the mean over its slices.
- Saliency (`gradcam.gradcam_maps`): MONAI GradCAM of one class per crop, each map scaled to unit mass.

Modules: `settings` (`SupervisedSettings`), `networks`, `heads` (what a network predicts, its loss), `data`,
`loop`, `gradcam`. This file imports nothing: the config check reads `settings` from source without importing torch.
"""
