"""Datasets: raw sources in their published layouts -> prepared Parquet directories -> Ray Datasets for training."""
from .prepared import PreparedDataset, open_prepared
from .sources import DataError

__all__ = ["DataError", "PreparedDataset", "open_prepared"]
