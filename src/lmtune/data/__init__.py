"""Data: the registry of data sets, chat templates, tokenisation with label masks, packing."""

from lmtune.data.processing import DataStats, ProcessedData, prepare_data
from lmtune.data.templates import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "DataStats", "ProcessedData", "prepare_data"]
