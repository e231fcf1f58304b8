"""Data layer: readers, preprocessing, splits, negative sampling, synthetic data."""
from .dataset import (Catalogue, catalogue_of, data_stats, load_interactions,
                      load_item_content, split_of)
from .types import DataError, Interactions, ItemContent, Split

__all__ = ["Catalogue", "catalogue_of", "data_stats", "load_interactions",
           "load_item_content", "split_of", "DataError", "Interactions", "ItemContent",
           "Split"]
