"""The model protocol: what the trainer (`cohortlens.models.training`), the registry and the embedder
(`cohortlens.embed.autoencoder`) expect of an autoencoder.

A trainable model is a `torch.nn.Module` with

    name: str                   # registry key: "vae" | "dae"
    embedding_dim: int          # length of the per-slice embedding (VAE 128, DAE 512)
    def training_loss(self, x) -> tuple[Tensor, dict[str, Tensor | float]]
        # x: (B, 1, H, W) float in [-1, 1]; returns the scalar loss to minimise and named parts for the log.
        # Parts may be floats or 0-dim tensors; detached tensors are better on a GPU (no sync per step).
        # Randomness comes from torch's global RNG (seeded and checkpointed by the trainer).
    @torch.no_grad()
    def embed(self, x) -> Tensor          # (B, embedding_dim), deterministic (VAE: encoder mean μ)
    def qa_images(self, x) -> dict[str, Tensor]   # optional: name -> (B, 1, H, W) in [-1, 1], one row each
                                                  # of reconstructions.png (e.g. "input", "reconstruction")
    @classmethod
    def from_config(cls, cfg: dict) -> Module     # builds from a resolved models.<name> config (the registry
                                                  # calls it; `crop` is the input size)

Normalisation layers must not depend on the batch (GroupNorm / InstanceNorm), because embedding runs in
eval mode on arbitrary batches and the VAE's Hessian penalty evaluates the decoder on stacked batches.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class AutoencoderModel(Protocol):
    """See the module docstring: the contract between the trainer / embedder and a model."""

    name: str
    embedding_dim: int

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]: ...

    def embed(self, x: Tensor) -> Tensor: ...
