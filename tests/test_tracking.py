"""train.log_to=tensorboard: scalars and pictures as TensorBoard events, read back with TensorBoard's own
event reader; log.jsonl is written as always."""

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from .helpers import run_cli  # noqa: E402


def test_tensorboard_events_hold_the_log_and_the_pictures(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "classify", "--model", "nano", "--steps", "4", "--out", str(run),
                           "--quiet", "--set", "train.log_every=1", "--set", "train.eval_every=2",
                           "--set", "train.log_to=tensorboard", "--set", "train.batch_size=16")
    assert code == 0, err
    assert len((run / "log.jsonl").read_text().splitlines()) == 4 + 2
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "img_s", "val/top1", "val/val_loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/top1")] == [2, 4]
    assert {"loss", "confusion"} <= set(tags["images"])
    img = events.Images("confusion")[0]
    assert img.step == 4 and img.width > 50 and img.encoded_image_string[:4] == b"\x89PNG"


def test_an_unknown_tracker_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "classify", "--out", str(tmp_path / "r"), "--set", "train.log_to=wandb")
    assert code == 2 and "train.log_to='wandb': choose one of jsonl, tensorboard" in err
