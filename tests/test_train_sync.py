"""The training step reads its losses and logs to the host once per optimizer step (one device-to-host copy on
CUDA, not one per micro-batch and logged value); the values logged are the ones read one by one before."""

import json
import warnings

import pytest
import torch

from patchgpt.tasks import Classify
from patchgpt.train import _host_floats, train

from .helpers import tiny_config


def test_accumulated_loss_and_logs_are_logged_as_read_one_by_one(tmp_path, monkeypatch):
    seen: list[tuple[float, float]] = []
    forward = Classify.forward

    def recording(self, batch, gen=None):
        loss, logs = forward(self, batch, gen)
        aux = loss.detach() / 3
        if self.training:
            seen.append((float(loss.detach()), float(aux)))
        return loss, {**logs, "aux": aux}

    monkeypatch.setattr(Classify, "forward", recording)
    cfg = tiny_config("classify", tmp_path / "acc", steps=3)
    cfg.train.accum = 4
    out = train(cfg, quiet=True)
    rows = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and len(seen) == 12
    for i, row in enumerate(rows):
        micro = seen[4 * i:4 * i + 4]
        total = 0.0
        for loss, _ in micro:
            total += loss / 4
        assert row["loss"] == total              # bit for bit: the same sum in the same order
        assert row["aux"] == micro[-1][1]        # logs: the last micro-batch's, as before


def test_host_floats_is_float_of_each():
    xs = [torch.tensor(1 / 3), torch.tensor(2 / 3, dtype=torch.bfloat16), 0.25, 7, torch.tensor([5.5]),
          torch.tensor(3, dtype=torch.int64)]
    assert _host_floats(xs) == [float(x) for x in xs]
    assert _host_floats([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_floats_on_cuda_reads_once_and_exactly():
    dev = torch.device("cuda")
    xs = [torch.tensor(1 / 3, device=dev), torch.tensor(1 / 7, device=dev, dtype=torch.bfloat16),
          torch.tensor(2 / 9, device=dev, dtype=torch.float16), torch.tensor([1 / 11], device=dev, dtype=torch.float64),
          torch.tensor(float("nan"), device=dev), torch.tensor(float("inf"), device=dev), 0.5,
          torch.tensor(4, device=dev), torch.tensor(1 / 13)]
    want = [float(x) for x in xs]
    got = _host_floats(xs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == w or (g != g and w != w)   # NaN stays NaN

    def syncs(fn) -> int:  # host syncs `fn` makes, as torch's sync debug mode counts them
        ys = [torch.tensor(float(i), device=dev) / 3 for i in range(5)]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn(ys)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    plain = syncs(lambda ys: [float(y) for y in ys])
    if plain != 5:
        pytest.skip(f"sync debug mode counted {plain} syncs for 5 reads; cannot count here")
    assert syncs(_host_floats) == 1
