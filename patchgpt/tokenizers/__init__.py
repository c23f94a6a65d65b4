"""Tokenizers turn data into `Sequence`s and back."""

from .colors import ColorClusters
from .patches import Patches, grid_positions, normalize_patches

__all__ = ["ColorClusters", "Patches", "grid_positions", "normalize_patches"]
