"""Small configurations shared by the tests."""

from patchgpt.cli import main
from patchgpt.config import RunConfig, apply_size
from patchgpt.tasks import default_config


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the `patchgpt` command in-process; returns (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_config(task: str, out, steps: int = 3, **sets) -> RunConfig:
    cfg = default_config(task)
    apply_size(cfg, "nano")
    cfg.out = str(out)
    cfg.train.steps = steps
    cfg.train.warmup = 1
    cfg.train.log_every = 1
    cfg.train.batch_size = 16
    return cfg
