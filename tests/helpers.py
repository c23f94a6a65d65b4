"""Small configurations shared by the tests."""

from patchgpt.config import RunConfig, apply_size, default_config


def tiny_config(task: str, out, steps: int = 3, **sets) -> RunConfig:
    cfg = default_config(task)
    apply_size(cfg, "nano")
    cfg.out = str(out)
    cfg.train.steps = steps
    cfg.train.warmup = 1
    cfg.train.log_every = 1
    cfg.train.batch_size = 16
    return cfg
