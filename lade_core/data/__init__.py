"""Datasets: raw sources in their published layouts -> prepared Parquet directories -> Ray Datasets for training."""
from lade_core.data.prepared import DECODE_PLACES, PreparedDataset, decode_place, open_prepared
from lade_core.data.sources import DataError

__all__ = ["DECODE_PLACES", "DataError", "PreparedDataset", "decode_place", "open_prepared"]
