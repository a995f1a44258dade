"""Data: NIfTI pairs on the working grid (dataset), the pre-processing geometry, and the embedded demo dataset."""
from data_loader.dataset import DEFAULT_LABELS, PairDataset, load_labels

__all__ = ["DEFAULT_LABELS", "PairDataset", "load_labels"]
