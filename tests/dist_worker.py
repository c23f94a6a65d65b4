"""One process of a `torchrun` test run: train a tiny model, then save this rank's parameters.

Usage: ``torchrun --standalone --nproc_per_node=N tests/dist_worker.py TASK OUT STEPS [KEY=VALUE ...]``;
without torchrun it is the one-process reference. Each rank writes ``OUT/rank{R}.safetensors``.
"""

import importlib
import os
import sys

from safetensors.torch import save_file

from patchgpt import dist
from patchgpt.config import apply_size, set_override
from patchgpt.tasks import default_config

T = importlib.import_module("patchgpt.train")  # the module (`patchgpt.train` the name is the function)


def main() -> None:
    task_name, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = default_config(task_name)
    apply_size(cfg, "nano")
    cfg.out = out
    cfg.train.steps, cfg.train.warmup, cfg.train.log_every, cfg.train.batch_size = steps, 1, 1, 16
    cfg.train.device = "cpu"  # gloo and CPU everywhere, also on machines with GPUs
    for s in sys.argv[4:]:
        set_override(cfg, s)
    captured = {}
    wrap = dist.wrap

    def capture(task, env, blocks=(), fsdp=False):
        captured["task"] = task
        model = wrap(task, env, blocks, fsdp)
        if hasattr(model, "register_comm_hook"):  # DDP: count gradient all-reduces (one per bucket)
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state, bucket):
                captured["allreduces"] = captured.get("allreduces", 0) + 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting)
        return model

    dist.wrap = capture
    T.train(cfg, quiet=True, resume=bool(os.environ.get("RESUME")), until=int(os.environ.get("UNTIL", 0)) or None)
    if not cfg.train.fsdp:  # FSDP ranks hold shards; the checkpoint has the gathered weights
        sd = {k: v.detach().contiguous() for k, v in captured["task"].state_dict().items()}
        rank = os.environ.get("RANK", 0)
        save_file(sd, f"{out}/rank{rank}.safetensors", metadata={"allreduces": str(captured.get("allreduces", 0))})
    dist.cleanup()


if __name__ == "__main__":
    main()
