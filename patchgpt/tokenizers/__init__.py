"""Tokenizers turn data into `Sequence`s and back; pixel tokenizers follow the `Tokenizer` protocol."""

from .base import Tokenizer
from .colors import ColorClusters
from .inputs import PixelInput, resolve_runs
from .labels import ClassLabel
from .patches import Patches, grid_positions, normalize_patches
from .text import Bytes
from .tubelets import Tubelets

__all__ = ["Bytes", "ClassLabel", "ColorClusters", "Patches", "PixelInput", "Tokenizer", "Tubelets",
           "grid_positions", "normalize_patches", "resolve_runs"]
