"""Many processes and runs that survive: torchrun (DDP, FSDP) against one process, SIGKILL and resume,
interrupted checkpoint writes, the global batch arithmetic."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import patchgpt
from patchgpt import checkpoint
from patchgpt.config import ConfigError, set_override
from patchgpt.train import make_optimizer, train

from .helpers import tiny_config

WORKER = Path(__file__).with_name("dist_worker.py")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cpu_config(task: str, out, steps: int):
    cfg = tiny_config(task, out, steps=steps)
    cfg.train.device, cfg.train.threads = "cpu", 1  # the same arithmetic as the CPU subprocesses
    return cfg


def torchrun(n: int, *args: str, timeout: int = 240, **env) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(WORKER),
           *args]
    r = subprocess.run(cmd, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def final_weights(run: Path) -> dict:
    return load_file(str(checkpoint.resolve(run) / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """DDP over 2 gloo ranks, 2 micro-steps each (no_sync on the first), augmentation on: both ranks end
    with identical parameters, and loss and parameters match one process with the same global batch."""
    sets = ["train.accum=2", "train.threads=1"]
    torchrun(2, "pretrain", str(tmp_path / "two"), "6", *sets)
    r0, r1 = (load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # Gradients are all-reduced on the last micro-step of each step only: 6 steps, one bucket (a nano model).
    with safe_open(str(tmp_path / "two" / "rank0.safetensors"), "pt") as f:
        assert f.metadata()["allreduces"] == "6"

    cfg = cpu_config("pretrain", tmp_path / "one", steps=6)
    for s in sets:
        set_override(cfg, s)
    train(cfg, quiet=True)
    one = patchgpt.load(tmp_path / "one").state_dict()
    for k, v in one.items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-5)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    assert not (tmp_path / "two" / "rank1").exists()  # rank 0 alone writes the run directory
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["val_loss"] > 0


@pytest.mark.slow
def test_fsdp_runs_resumes_and_matches_one_process(tmp_path):
    """FSDP2 (fully_shard) over 2 gloo ranks, stopped at step 2 and resumed: its checkpoints hold the
    gathered weights and optimizer state, and it ends where one process with the same global batch ends."""
    # FSDP leaves the auto EMA out (the average is not sharded): the one-process run does too, to compare.
    sets = ["train.ckpt_every=2", "train.threads=1", "train.ema=0"]
    torchrun(2, "classify", str(tmp_path / "fsdp"), "4", "train.fsdp=true", *sets, UNTIL="2")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "fsdp")] == ["step_0000002"]
    torchrun(2, "classify", str(tmp_path / "fsdp"), "4", "train.fsdp=true", *sets, RESUME="1")
    cfg = cpu_config("classify", tmp_path / "one", steps=4)
    for s in sets:
        set_override(cfg, s)
    train(cfg, quiet=True)
    a, b = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    patchgpt.load(tmp_path / "fsdp")  # a plain (unsharded) model loads from an FSDP run


def test_fsdp_needs_torchrun_and_batch_must_split(tmp_path):
    cfg = tiny_config("pretrain", tmp_path / "f")
    cfg.train.fsdp = True
    with pytest.raises(ConfigError, match="torchrun"):
        train(cfg, quiet=True)
    cfg = tiny_config("pretrain", tmp_path / "b")
    cfg.train.batch_size, cfg.train.accum = 6, 4
    with pytest.raises(ConfigError, match="not divisible"):
        train(cfg, quiet=True)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 60
    args = ["classify", "--model", "nano", "--steps", str(steps), "--quiet", "--set", "train.batch_size=16",
            "--set", "train.warmup=1", "--set", "train.ckpt_every=3", "--set", "train.threads=1",
            "--set", "train.log_every=1", "--set", "train.device=cpu"]
    run = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "patchgpt", "train", *args, "--out", str(run)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        done = checkpoint.list_checkpoints(run)
        if done and int(done[-1].name.split("_")[1]) >= 9:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(checkpoint.list_checkpoints(run)[-1].name.split("_")[1])
    assert 9 <= killed_at < steps
    r = subprocess.run([sys.executable, "-m", "patchgpt", "train", *args, "--out", str(run), "--resume"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    ref = cpu_config("classify", tmp_path / "ref", steps=steps)
    ref.train.ckpt_every = 3
    train(ref, quiet=True)
    a, b = final_weights(run), final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert [s for s in logged] == sorted(logged) and logged[-1] == steps
    assert not list((run / "checkpoints").glob(".tmp*"))


class Boom(RuntimeError):
    pass


def _events(monkeypatch, fail_at: int | None) -> list[str]:
    """Count (and optionally fail at the fail_at-th) the steps of a checkpoint write."""
    seen: list[str] = []

    def hook(name, fn):
        def inner(*a, **k):
            seen.append(name)
            if fail_at is not None and len(seen) - 1 == fail_at:
                raise Boom(name)
            return fn(*a, **k)
        return inner

    monkeypatch.setattr(checkpoint, "save_file", hook("save_file", checkpoint.save_file))
    monkeypatch.setattr(checkpoint, "_write_json", hook("write_json", checkpoint._write_json))
    monkeypatch.setattr(checkpoint.os, "fsync", hook("fsync", checkpoint.os.fsync))
    monkeypatch.setattr(Path, "rename", hook("rename", Path.rename))
    monkeypatch.setattr(checkpoint, "_fsync_dir", hook("fsync_dir", checkpoint._fsync_dir))
    return seen


def test_an_interrupted_checkpoint_write_never_hides_the_previous_one(tmp_path, monkeypatch):
    """Fail a save at each of its steps in turn (weights, optimizer, trainer.json, config.json, each fsync,
    the rename, the directory fsync): the newest visible checkpoint always loads, and the next save
    sweeps the leftovers away. Also for a save that replaces an existing step (a re-run's last save)."""
    src = tmp_path / "src"
    train(tiny_config("pretrain", src, steps=2), quiet=True)
    good = checkpoint.resolve(src)
    task = patchgpt.load(src)
    cfg = tiny_config("pretrain", src, steps=2)
    opt = make_optimizer(task, cfg, torch.device("cpu"))
    with monkeypatch.context() as m:
        events = _events(m, None)
        checkpoint.save(tmp_path / "probe", task, cfg, 3, opt, {"step": 3})
    assert "rename" in events and len(events) >= 8
    for replace in (False, True):
        for k in range(len(events) + replace):
            run = tmp_path / f"r{k}_{replace}"
            shutil.copytree(src, run)
            step = int(good.name.split("_")[1]) if replace else 3
            with monkeypatch.context() as m:
                _events(m, k)
                try:
                    checkpoint.save(run, task, cfg, step, opt, {"step": step})
                except Boom:
                    pass
            newest = checkpoint.resolve(run)
            # A kill between a replacing save's two renames leaves the old one as .old_step_N: still found.
            assert newest.name.removeprefix(".old_")[:12] in (good.name, f"step_{step:07d}"), (k, newest)
            patchgpt.load(run)
            state = checkpoint.load_training_state(newest, make_optimizer(task, cfg, torch.device("cpu")))
            assert state["step"] in (2, step)
            checkpoint.save(run, task, cfg, 5, opt, {"step": 5})  # a later save cleans up
            assert not list((run / "checkpoints").glob(".tmp*")), k
            assert checkpoint.resolve(run).name == "step_0000005"


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_then_one_process_resumes(tmp_path):
    """SIGTERM to the launcher reaches both ranks; they agree on the step to stop at and rank 0 writes
    that checkpoint. The run then resumes in one process (the global batch does not depend on the number
    of processes) and ends where an uninterrupted one-process run ends, to float rounding."""
    steps, run = 120, tmp_path / "run"
    args = ["pretrain", "--model", "nano", "--steps", str(steps), "--quiet", "--set", "train.batch_size=16",
            "--set", "train.warmup=1", "--set", "train.log_every=1", "--set", "train.threads=1",
            "--set", "train.device=cpu"]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "patchgpt", "train", *args, "--out", str(run)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    stopped = [int(c.name.split("_")[1]) for c in checkpoint.list_checkpoints(run)]
    assert len(stopped) == 1 and 10 <= stopped[0] < steps, err[-2000:]
    assert f"stopped at step {stopped[0]}" in err
    r = subprocess.run([sys.executable, "-m", "patchgpt", "train", *args, "--out", str(run), "--resume"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = cpu_config("pretrain", tmp_path / "ref", steps=steps)
    train(cfg, quiet=True)
    a, b = final_weights(run), final_weights(tmp_path / "ref")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
