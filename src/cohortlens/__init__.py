"""cohortlens: medical-imaging cohort -> autoencoder embeddings -> bias and data-quality report."""

__version__ = "0.1.0"
