"""Tokenizers turn data into `Sequence`s and back."""

from .colors import ColorClusters
from .labels import ClassLabel
from .patches import Patches, grid_positions, normalize_patches
from .text import Bytes
from .tubelets import Tubelets

__all__ = ["Bytes", "ClassLabel", "ColorClusters", "Patches", "Tubelets", "grid_positions", "normalize_patches"]
