"""patchgpt: one GPT over image patch sequences — generative pretraining, probes and fine-tuning.

Public names: `GPT`, `GPTConfig`, `SIZES`, `Sequence`, `Vocab`, `load`, `train`, `TASKS`, `DATASETS`.
"""

__version__ = "0.1.0"

from .checkpoint import load  # noqa: E402
from .config import RunConfig, default_config  # noqa: E402
from .data import DATASETS  # noqa: E402
from .model import GPT, SIZES, GPTConfig, KVCache  # noqa: E402
from .sequence import IGNORE, Sequence, Vocab  # noqa: E402
from .tasks import TASKS  # noqa: E402
from .train import train  # noqa: E402

from_pretrained = load

__all__ = ["DATASETS", "GPT", "GPTConfig", "IGNORE", "KVCache", "RunConfig", "SIZES", "Sequence", "TASKS",
           "Vocab", "default_config", "from_pretrained", "load", "train", "__version__"]
