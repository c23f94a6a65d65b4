"""patchgpt: one GPT over image patch sequences — generative pretraining, probes, fine-tuning, generation,
detection and video, each a task over the same backbone.

Public names: `GPT`, `GPTConfig`, `SIZES`, `Sequence`, `Vocab`, `load`, `train`, `default_config`, `TASKS`,
`DATASETS`.
"""

from . import threading_env  # noqa: F401 - first: OpenMP reads its environment when torch loads it
from .config import RunConfig
from .data import DATASETS
from .model import GPT, SIZES, GPTConfig, KVCache
from .sequence import IGNORE, Sequence, Vocab
from .tasks import TASKS, default_config, load
from .train import train
from .version import __version__

__all__ = ["DATASETS", "GPT", "GPTConfig", "IGNORE", "KVCache", "RunConfig", "SIZES", "Sequence", "TASKS",
           "Vocab", "default_config", "load", "train", "__version__"]
