"""The compositional text-to-image check: digit-scenes captions parse back, training scenes hold the held-out
combinations out, the scoring counts digits and relations as documented, and `patchgpt eval GEN --judge
DETECT` runs end to end."""

import json
from collections import Counter

import pytest
import torch

import patchgpt
from patchgpt.cli import main
from patchgpt.config import ConfigError, DataConfig
from patchgpt.data import DATASETS, build_datasets
from patchgpt.data.base import DataError, DataInfo
from patchgpt.data.scenes import (
    Layout,
    digit_scenes,
    held_out,
    held_out_captions,
    pair_relation,
    parse_caption,
    relations,
)
from patchgpt.tasks.compose import compose_check, held_out_of, score_sample, tally


def _px(item) -> list[list[float]]:
    """An item's boxes in canvas pixels (64: the default canvas)."""
    return (item["boxes"] * 64).tolist()


def test_captions_parse_back_into_what_they_ask_for():
    train, val = digit_scenes(n_train=600, n_val=400)
    kinds = Counter()
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            lay = parse_caption(item["text"])
            assert lay.caption() == item["text"]                            # the round trip
            classes = item["classes"].tolist()
            assert sorted(lay.digits) == sorted(classes)
            kinds[lay.relation] += 1
            if len(classes) == 2:
                first, rel, second = pair_relation(*_px(item))
                assert (lay.digits, lay.relation) == ((classes[first], classes[second]), rel)
            # The exact boxes as detections (a perfect detector) meet every request, sizes included.
            s = score_sample(lay, item["boxes"], classes, torch.ones(len(classes)))
            assert (s.found, s.exact, s.holds) == (len(classes), True, True if lay.relation else None)
    assert set(kinds) == {None, "left of", "above", "left to right"}
    assert parse_caption("nothing") == Layout((), (), None)
    assert parse_caption("a large 3 above a 7") == Layout((3, 7), ("large", ""), "above")
    assert parse_caption("a 1, a 2, a 3 and a 4 from left to right").digits == (1, 2, 3, 4)
    for bad in ("a 10", "a 3 below a 7", "two 3s", "a medium 3", "a 3 and a 4 from left to right", ""):
        with pytest.raises(ValueError, match="not a digit-scenes caption"):
            parse_caption(bad)


def test_held_out_combinations_never_reach_training():
    combos = held_out(0)   # the list in docs/generation.md
    assert combos == held_out(0) and combos != held_out(1) and len(set(combos)) == 10
    pairs = [frozenset((a, b)) for a, _, b in combos]
    assert len(set(pairs)) == 10 and all(len(p) == 2 for p in pairs)          # ten different pairs of digits
    assert Counter(d for p in pairs for d in p) == dict.fromkeys(range(10), 2)  # each digit in two of them
    assert {r for _, r, _ in combos} <= {"left of", "above"}
    assert combos == ((6, "left of", 7), (0, "left of", 7), (0, "above", 2), (2, "above", 9), (9, "above", 8),
                      (8, "above", 4), (3, "left of", 4), (3, "left of", 1), (5, "left of", 1), (6, "left of", 5))
    captions = held_out_captions(combos)
    asked = [c for c in combos for _ in range(3)]
    assert len(captions) == 30 and all(parse_caption(c).plain() == f"a {a} {r} a {b}"
                                       for c, (a, r, b) in zip(captions, asked, strict=True))

    plain_train, plain_val = digit_scenes(n_train=1500, n_val=50)
    train, val = digit_scenes(n_train=1500, n_val=50, holdout=0)
    held, shown, sizes = set(combos), 0, Counter()
    for i in range(len(train)):
        item, plain = train[i], plain_train[i]
        assert not relations(_px(item), item["classes"].tolist()) & held
        if relations(_px(plain), plain["classes"].tolist()) & held:
            shown += 1                                                           # redrawn
        else:
            assert item["text"] == plain["text"] and torch.equal(item["image"], plain["image"])
        sizes[len(item["classes"])] += 1
    assert shown > 50                                     # without the option, training would show them
    assert sizes[2] > 0.2 * len(train)                    # two-digit scenes stay common
    for i in range(len(val)):                             # validation scenes are unchanged
        assert val[i]["text"] == plain_val[i]["text"] and torch.equal(val[i]["image"], plain_val[i]["image"])


def test_digit_scenes_options_in_the_spec():
    assert DATASETS["digit-scenes"].usage("digit-scenes") == "digit-scenes[:holdout=N,canvas=PX,scenes=N]"
    assert not DATASETS["digit-scenes"].takes_arg
    train, val, info = build_datasets(DataConfig(spec="digit-scenes:holdout=3,canvas=64", image_size=32))
    big, _, _ = build_datasets(DataConfig(spec="digit-scenes:holdout=3"))
    assert info.image_size == (32, 32) and train[5]["image"].shape == (1, 32, 32)
    # The same scene at half the size: its caption, question and normalized boxes as drawn on 64 pixels.
    for k in ("text", "question", "answer"):
        assert train[5][k] == big[5][k]
    assert torch.equal(train[5]["boxes"], big[5]["boxes"])
    torch.testing.assert_close(train[5]["image"], torch.nn.functional.avg_pool2d(big[5]["image"], 2))
    assert train[5]["meta"]["width"] == 32
    assert [a["bbox"][2] * 2 for a in train[5]["meta"]["gt"]] == [a["bbox"][2] for a in big[5]["meta"]["gt"]]
    assert held_out_of("digit-scenes:holdout=3,canvas=64") == (held_out(3), True)
    assert held_out_of("digit-scenes") == (held_out(0), False)
    more, _, _ = build_datasets(DataConfig(spec="digit-scenes:holdout=3,canvas=64,scenes=20000", image_size=32))
    assert (len(train), len(more)) == (16000, 20000)      # more scenes: the first 16000 are the same ones
    assert more[5]["text"] == train[5]["text"] and torch.equal(more[5]["image"], train[5]["image"])
    for bad in ("holdout=x", "seed=1", "canvas=2", "holdout", "scenes=0", "scenes=-3"):
        with pytest.raises(DataError, match=f"digit-scenes:{bad}:"):
            build_datasets(DataConfig(spec=f"digit-scenes:{bad}"))


def _dets(*objs):
    """Detections from (digit, (x0, y0, x1, y1), score) triples: boxes, digits, scores."""
    return (torch.tensor([o[1] for o in objs], dtype=torch.float32).reshape(-1, 4), [o[0] for o in objs],
            torch.tensor([o[2] for o in objs], dtype=torch.float32))


def test_scoring_counts_digits_once_and_judges_relations_by_centres():
    lay = parse_caption("a 3 left of a 7")
    left, right, top, bottom = (0.1, 0.4, 0.3, 0.7), (0.6, 0.4, 0.8, 0.7), (0.4, 0.05, 0.6, 0.35), (0.4, 0.6, 0.6, 0.9)
    s = score_sample(lay, *_dets((3, left, 0.9), (7, right, 0.8)))
    assert (s.found, s.holds, s.mark) == (2, True, "ok")
    s = score_sample(lay, *_dets((7, left, 0.9), (3, right, 0.8)))              # both found, wrong way round
    assert (s.found, s.holds, s.mark) == (2, False, "relation")
    s = score_sample(lay, *_dets((3, left, 0.9), (1, right, 0.8)))              # the 7 missing
    assert (s.found, s.holds, s.mark) == (1, False, "missing")
    s = score_sample(lay, *_dets((3, left, 0.4), (7, right, 0.8)))              # under the score threshold
    assert s.found == 1 and score_sample(lay, *_dets((3, left, 0.4), (7, right, 0.8)), min_score=0.3).found == 2
    # Vertical offsets dominate: the 3 above the 7 is not "left of" it, though its centre is a little left.
    s = score_sample(lay, *_dets((3, (0.35, 0.05, 0.55, 0.35), 0.9), (7, bottom, 0.9)))
    assert (s.found, s.holds) == (2, False)
    assert score_sample(parse_caption("a 3 above a 7"), *_dets((3, top, 0.9), (7, bottom, 0.9))).holds
    # The best-scoring detection of a digit is the one matched; each detection counts once.
    s = score_sample(lay, *_dets((3, right, 0.6), (3, left, 0.95), (7, (0.45, 0.4, 0.65, 0.7), 0.9)))
    assert (s.found, s.holds, s.assigned) == (2, True, [1, 2])
    twin = parse_caption("a 3 left of a 3")
    assert score_sample(twin, *_dets((3, left, 0.9))).found == 1
    assert score_sample(twin, *_dets((3, right, 0.9), (3, left, 0.8))).holds
    # Size words: by the detected box height, as `describe` gives them; they decide `exact`, not `holds`.
    small, large = (0.1, 0.4, 0.25, 0.55), (0.6, 0.3, 0.9, 0.75)                # heights 0.15 and 0.45
    sized = parse_caption("a small 3 left of a large 7")
    assert score_sample(sized, *_dets((3, small, 0.9), (7, large, 0.9))).exact
    s = score_sample(sized, *_dets((3, large, 0.9), (7, (0.05, 0.4, 0.2, 0.55), 0.9)))
    assert not s.exact and not s.holds
    s = score_sample(parse_caption("a large 3 left of a small 7"), *_dets((3, (0, 0.1, 0.2, 0.3), 0.9),
                                                                          (7, (0.5, 0.1, 0.7, 0.3), 0.9)))
    assert s.holds and not s.exact
    # Three digits: the order from left to right.
    row = parse_caption("a 1, a 2 and a 3 from left to right")
    boxes = [(0.0, 0.2, 0.2, 0.4), (0.3, 0.6, 0.5, 0.8), (0.7, 0.1, 0.9, 0.3)]
    assert score_sample(row, *_dets(*[(d, b, 0.9) for d, b in zip((1, 2, 3), boxes, strict=True)])).holds
    assert not score_sample(row, *_dets(*[(d, b, 0.9) for d, b in zip((2, 1, 3), boxes, strict=True)])).holds
    # Tally: digits over requested digits, relations over samples asked for one.
    t = tally([score_sample(lay, *_dets((3, left, 0.9), (7, right, 0.8))),
               score_sample(lay, *_dets((3, left, 0.9))),
               score_sample(parse_caption("a 5"), *_dets((5, left, 0.9)))])
    assert t == {"digits_found": 4 / 5, "relations_hold": 1 / 2, "captions_exact": 2 / 3, "n": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny text-to-image model of digit-scenes (10 combinations held out, 16 px from a 64 px canvas) and a
    tiny detector (32 px), one step each."""
    root = tmp_path_factory.mktemp("compose")
    common = ["--model", "nano", "--steps", "1", "--quiet", "--set", "train.batch_size=4", "--set",
              "train.eval_every=0"]
    assert main(["train", "generate", "--data", "digit-scenes:holdout=0,canvas=64", "--out", str(root / "gen"),
                 "--set", "data.image_size=16", "--set", "tokenizer.n_colors=4", "--set", "generate.text_len=40",
                 "--set", "generate.layout=on", *common]) == 0
    assert main(["train", "detect", "--data", "digit-scenes", "--out", str(root / "det"),
                 "--set", "data.image_size=32", *common]) == 0
    return root


def test_eval_with_a_detector_judge_runs_the_compositional_check(runs, capsys):
    capsys.readouterr()
    assert main(["eval", str(runs / "gen"), "--judge", str(runs / "det"), "--per-class", "2", "--cfg", "1",
                 "--json", "--out", str(runs / "ev")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["compose_n"] == 60 and m["compose_captions"] == 30 and m["compose_unseen"] is True
    for k in ("compose_digits_found", "compose_relations_hold", "compose_captions_exact",
              "compose_real_digits_found", "compose_real_relations_hold",
              "compose_layout_digits_found", "compose_layout_relations_hold"):    # layout first: its plan
        assert 0 <= m[k] <= 1
    assert m["compose_real_n"] > 50 and m["bits_per_dim"] > 0
    assert set(m["compose_per_combination"]) == {f"a {a} {r} a {b}" for a, r, b in held_out(0)}
    assert (runs / "ev" / "eval_compose.png").stat().st_size > 0 and m["compose_png"].endswith("eval_compose.png")


class PerfectDetector:
    """A stand-in judge that returns the exact boxes of the scenes it was given (score 1) and nothing else."""

    def __init__(self, items, size):
        self.info = DataInfo(channels=1, image_size=(size, size), classes=[str(d) for d in range(10)], boxes=True)
        self.device = torch.device("cpu")
        self.truth = {it["image"].numpy().tobytes(): it for it in items}

    def predict(self, batch):
        out = []
        for image in batch["image"]:
            it = self.truth.get(image.numpy().tobytes())
            n = 0 if it is None else len(it["classes"])
            out.append({"boxes": it["boxes"] if n else torch.zeros(0, 4),
                        "classes": it["classes"] if n else torch.zeros(0, dtype=torch.long),
                        "scores": torch.ones(n)})
        return {"detections": out}


def test_the_api_scores_real_scenes_perfectly_through_a_perfect_detector(runs, tmp_path, capsys):
    gen = patchgpt.load(runs / "gen")
    _, val, _ = build_datasets(gen.cfg.data)
    judge = PerfectDetector([val[i] for i in range(len(val))], 16)
    res = compose_check(gen, judge, captions=["a 3 left of a 7", "a small 0 above a large 2"], per_caption=3,
                        val_set=val, real=40, cfg_scale=1.0)
    assert res["compose_n"] == 6 and res["images"].shape == (6, 1, 16, 16)
    assert res["texts"][3] == "a small 0 above a large 2"
    assert res["compose_digits_found"] == 0 and res["compose_relations_hold"] == 0   # noise: nothing detected
    assert (res["compose_real_digits_found"], res["compose_real_relations_hold"], res["compose_real_captions_exact"],
            res["compose_real_n"]) == (1.0, 1.0, 1.0, 40)
    again = compose_check(gen, judge, captions=["a 3 left of a 7", "a small 0 above a large 2"], per_caption=3,
                          cfg_scale=1.0)
    assert torch.equal(again["images"], res["images"]) and "compose_real_n" not in again   # seeded
    with pytest.raises(ConfigError, match="reads digit-scenes captions"):
        compose_check(gen, judge, captions=["a red car"], per_caption=1)
    # A generator whose data held nothing out: the check still runs, says so, and warns.
    gen.cfg.data.spec = "digit-scenes:canvas=64"
    res = compose_check(gen, judge, per_caption=1)
    assert res["compose_unseen"] is False and res["compose_n"] == 30
    assert "held nothing out" in capsys.readouterr().err


def test_a_detector_judges_only_text_conditional_generators(tmp_path, runs):
    cls_gen = tmp_path / "cls"
    assert main(["train", "generate", "--out", str(cls_gen), "--model", "nano", "--steps", "1", "--quiet",
                 "--set", "generate.condition=class", "--set", "tokenizer.n_colors=4",
                 "--set", "train.batch_size=4", "--set", "train.eval_every=0"]) == 0
    with pytest.raises(ConfigError, match="class-conditional"):
        compose_check(patchgpt.load(cls_gen), patchgpt.load(runs / "det"))
    assert main(["eval", str(cls_gen), "--judge", str(runs / "det")]) == 2
