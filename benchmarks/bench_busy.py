"""Training throughput beside a busy neighbour: how much of its quiet speed a run keeps.

On a laptop something else is always running. Two-thread runs of small models collapse when one other
busy process shares two cores, because OpenMP threads spin-wait for each other. This benchmark trains the
default `classify` run on the bundled digits in fresh processes, quiet and beside one pure-Python busy loop,
under several threading settings, and prints each setting's median img/s and the busy/quiet ratio. The
peer is the same run under PyTorch's default threading (all cores, OpenMP's default spin-waiting).

    python benchmarks/bench_busy.py            # ~3 minutes on 2 cores; run it on an otherwise idle machine
    python benchmarks/bench_busy.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER = "torch default (2 threads)"
SETTINGS = {  # name -> environment and train.threads (0 = patchgpt's choice)
    PEER: ({"PATCHGPT_THREADING": "torch"}, 0),
    "2 threads, OpenMP passive wait": ({"PATCHGPT_THREADING": "torch", "OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "2 threads, GOMP_SPINCOUNT=10000": ({"PATCHGPT_THREADING": "torch", "GOMP_SPINCOUNT": "10000"}, 2),
    "2 threads, GOMP_SPINCOUNT=1000": ({"PATCHGPT_THREADING": "torch", "GOMP_SPINCOUNT": "1000"}, 2),
    "1 thread": ({"PATCHGPT_THREADING": "torch"}, 1),
    "patchgpt default": ({}, 0),
}


def worker(out: str, steps: int, threads: int) -> None:
    """Train and print the median img/s over the steps after warm-up."""
    from patchgpt import default_config, train
    from patchgpt.config import apply_size

    cfg = default_config("classify")
    apply_size(cfg, "micro")
    cfg.out, cfg.train.steps, cfg.train.log_every, cfg.train.threads = out, steps, 1, threads
    cfg.train.eval_every = 0
    train(cfg, quiet=True)
    rows = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines() if '"img_s"' in x]
    print(json.dumps({"img_s": statistics.median(r["img_s"] for r in rows[steps // 3:])}))


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(env: dict, threads: int, steps: int, neighbour: bool) -> float:
    hog = busy() if neighbour else None
    try:
        time.sleep(0.5 if neighbour else 0)
        with tempfile.TemporaryDirectory() as d:
            keep = {k: v for k, v in os.environ.items()
                    if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PATCHGPT_THREADING")}
            full = {**keep, **env}
            r = subprocess.run([sys.executable, __file__, "--worker", str(Path(d) / "run"), "--steps", str(steps),
                                "--threads", str(threads)], env=full, capture_output=True, text=True, check=True)
            return json.loads(r.stdout.strip().splitlines()[-1])["img_s"]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.threads)
    steps, repeats = (12, 1) if a.quick else (a.steps, a.repeats)
    results = {}
    for name, (env, threads) in SETTINGS.items():
        quiet = statistics.median(measure(env, threads, steps, False) for _ in range(repeats))
        loaded = statistics.median(measure(env, threads, steps, True) for _ in range(repeats))
        results[name] = {"quiet_img_s": quiet, "busy_img_s": loaded, "kept": loaded / quiet}
        print(f"{name:40s} quiet {quiet:7.0f} img/s   beside a busy process {loaded:7.0f} img/s   "
              f"kept {100 * loaded / quiet:5.1f}%", flush=True)
    peer = results[PEER]
    ours = results["patchgpt default"]
    print(f"patchgpt default vs torch default: quiet {ours['quiet_img_s'] / peer['quiet_img_s']:.2f}x, "
          f"busy {ours['busy_img_s'] / peer['busy_img_s']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
