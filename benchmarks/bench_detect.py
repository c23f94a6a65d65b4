"""Detection decoding speed: batched decoding with the KV cache against the same model without it.

Workload: `Detect.predict` over 64x64 `digit-scenes` images in 8x8 patches (64 image tokens + a task token as
the bidirectional prefix): greedy decoding of up to ``max_objects`` objects (5 tokens each, plus the glimpse
token injected after each box) and the end token, with the box grammar enforced, then scoring and NMS. The
model is the trained checkpoint given by ``--ckpt`` (as in the README's recipe) or, without one, a random-init
`micro` detector. The no-cache path is the same `Detect.predict` with the tests' reference sampler
(``tests/reference_sampling.py``) standing in for `patchgpt.sampling.sample`: it recomputes the whole sequence
at every step; both decode the same tokens.

Measured: latency per image at batch 1 (ms) and images/s at ``--batch``, for `Detect.predict`'s decoding with
and without the cache, after a warm-up, interleaved over ``--repeats``; medians and the median per-repeat
ratio. Run: ``PYTHONPATH=. python benchmarks/bench_detect.py [--ckpt runs/detect] [--threads 2]``;
``--quick`` is a seconds-long smoke test; ``--json out.json`` writes the results dict.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import timed, write_json

import patchgpt.tasks.detect as detect_module
from patchgpt import default_config, load
from patchgpt.config import apply_size
from patchgpt.data.base import collate
from patchgpt.data.specs import build_datasets
from patchgpt.tasks import Detect
from patchgpt.tokenizers.boxes import TOKENS_PER_OBJECT
from tests.reference_sampling import uncached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="a trained detect run (default: a random-init micro detector)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: nano model, batch 4, 2 repeats")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.ckpt:
        task = load(args.ckpt)
    else:
        cfg = default_config("detect")
        cfg.data.spec = "digit-scenes"
        apply_size(cfg, "nano" if args.quick else "micro")
        cfg.detect.max_objects = 6
        task = Detect(cfg, build_datasets(cfg.data)[2]).eval()
    if args.quick:
        args.batch, args.repeats = 4, 2
    _, val, _ = build_datasets(task.cfg.data)
    images = collate([val[i] for i in range(args.batch)])["image"]
    n_obj = task.max_objects
    steps = TOKENS_PER_OBJECT * n_obj + 1

    def decode(x: torch.Tensor, use_cache: bool) -> list[dict]:
        if use_cache:
            return task.predict({"image": x})["detections"]
        with uncached(detect_module):   # `Detect.predict` samples with the full-forward reference
            return task.predict({"image": x})["detections"]

    runs = {"cache b1": lambda: decode(images[:1], True), "no-cache b1": lambda: decode(images[:1], False),
            f"cache b{args.batch}": lambda: decode(images, True),
            f"no-cache b{args.batch}": lambda: decode(images, False)}
    for a, b in zip(decode(images[:4], True), decode(images[:4], False), strict=True):
        assert torch.equal(a["classes"], b["classes"]) and torch.allclose(a["boxes"], b["boxes"]), "cache changed boxes"
    for f in runs.values():
        f()
    secs: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(args.repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            secs[n].append(timed(runs[n]))
    med = {n: statistics.median(v) for n, v in secs.items()}
    B = args.batch
    res = {"model": task.cfg.size, "params": task.num_params(), "tokens_decoded": steps, "batch": B,
           "threads": args.threads, "ckpt": args.ckpt,
           "latency_ms_b1": {"cache": 1e3 * med["cache b1"], "no-cache": 1e3 * med["no-cache b1"]},
           "images_per_s": {"cache": B / med[f"cache b{B}"], "no-cache": B / med[f"no-cache b{B}"]},
           "ratio_b1": statistics.median(a / b for a, b in zip(secs["no-cache b1"], secs["cache b1"], strict=True)),
           f"ratio_b{B}": statistics.median(a / b for a, b in zip(secs[f"no-cache b{B}"], secs[f"cache b{B}"],
                                                                  strict=True)),
           "seconds": secs}
    print(f"Detect {task.cfg.size} ({res['params'] / 1e6:.2f}M params), {steps} tokens decoded per image "
          f"({n_obj} objects + end), greedy, {args.threads} threads, {args.repeats} repeats (medians)")
    print(f"{'':10}{'latency b1 (ms)':>18}{f'images/s b{B}':>16}")
    for k in ("cache", "no-cache"):
        print(f"{k:10}{res['latency_ms_b1'][k]:18.1f}{res['images_per_s'][k]:16.1f}")
    print(f"cache / no-cache: {res['ratio_b1']:.2f}x at batch 1, {res[f'ratio_b{B}']:.2f}x at batch {B}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
