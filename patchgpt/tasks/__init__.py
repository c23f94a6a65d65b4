"""Tasks: each turns batches into `Sequence`s, owns its head and loss, and computes its metric."""

from .base import ImageInput, Task, next_token_loss
from .classify import Classify
from .detect import Detect
from .generate_image import Generate
from .pretrain import Pretrain
from .video import VideoClassify, VideoPretrain
from .vq import TrainVQ

TASKS: dict[str, type[Task]] = {"pretrain": Pretrain, "classify": Classify, "generate": Generate, "vq": TrainVQ,
                               "detect": Detect, "video-classify": VideoClassify, "video-pretrain": VideoPretrain}

__all__ = ["TASKS", "Classify", "Detect", "Generate", "ImageInput", "Pretrain", "Task", "TrainVQ", "VideoClassify",
           "VideoPretrain", "next_token_loss"]
