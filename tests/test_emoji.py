"""The `emoji` data set: rendered from the Noto Color Emoji font when it is installed."""

import pytest

from patchgpt.data import emoji
from patchgpt.data.base import DataError


def test_missing_font_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(emoji, "FONT_PATHS", ["/nonexistent/NotoColorEmoji.ttf"])
    monkeypatch.delenv("PATCHGPT_EMOJI_FONT", raising=False)
    with pytest.raises(DataError) as e:
        emoji.find_font()
    assert "apt install fonts-noto-color-emoji" in str(e.value) and "\n" not in str(e.value)


def test_emoji_render_with_captions():
    try:
        emoji.find_font()
    except DataError:
        pytest.skip("Noto Color Emoji is not installed")
    ds = emoji.Emoji(size=8, limit=12)
    item = ds[0]
    assert list(item) == ["image", "label", "text"]
    x, label, caption = item["image"], item["label"], item["text"]
    assert x.shape == (3, 8, 8) and -1 <= x.min() and x.max() <= 1
    assert len(ds) == 12 and ds.info.captions and caption == caption.lower() and caption == ds.info.classes[label]
    assert x.std() > 0.05  # a drawn emoji, not a blank canvas
