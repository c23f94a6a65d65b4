"""`emoji`: colour emoji rendered with Pillow from the Noto Color Emoji font, captioned with Unicode names.

Needs the font file (Debian/Ubuntu: ``apt install fonts-noto-color-emoji``; or set ``PATCHGPT_EMOJI_FONT``).
Each single-code-point emoji the font draws becomes one image, composited on white and resized to
``data.image_size`` (default 16), with its caption from `unicodedata.name` in lower case ("grinning face").
Labels are the emoji's index, so every emoji is its own class.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .base import DataError, DataInfo, ImageSet, Item
from .images import resize, to_tensor

FONT_PATHS = ["/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/noto/NotoColorEmoji.ttf",
              "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
              "/System/Library/Fonts/Apple Color Emoji.ttc"]
RANGES = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF),
          (0x2600, 0x26FF), (0x2700, 0x27BF)]


def find_font() -> Path:
    env = os.environ.get("PATCHGPT_EMOJI_FONT")
    for p in ([env] if env else []) + FONT_PATHS:
        if p and Path(p).is_file():
            return Path(p)
    raise DataError("emoji: the Noto Color Emoji font is not installed (apt install fonts-noto-color-emoji, "
                    "or set PATCHGPT_EMOJI_FONT=/path/to/NotoColorEmoji.ttf)")


def render(ch: str, font: ImageFont.FreeTypeFont, canvas: int = 136) -> Image.Image:
    """One emoji as an RGBA image cropped to its ink."""
    im = Image.new("RGBA", (canvas, canvas), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((canvas // 2, canvas // 2), ch, font=font, embedded_color=True, anchor="mm")
    box = im.getbbox()
    return im.crop(box) if box else im


class Emoji(ImageSet):
    """All renderable single-code-point emoji as items {"image": (3, S, S) in [-1, 1], "label": its index,
    "text": its name}."""

    def __init__(self, size: int = 16, limit: int | None = None) -> None:
        font = ImageFont.truetype(str(find_font()), size=109)  # the colour bitmap strike of Noto Color Emoji
        missing = np.asarray(render(chr(0x10FFFD), font))
        images, names = [], []
        for lo, hi in RANGES:
            for cp in range(lo, hi + 1):
                ch = chr(cp)
                name = unicodedata.name(ch, "")
                if not name or unicodedata.category(ch) != "So":
                    continue
                im = render(ch, font)
                a = np.asarray(im)
                if a.shape == missing.shape and np.array_equal(a, missing) or a[..., 3].max() == 0:
                    continue
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(bg, im).convert("RGB")
                images.append(to_tensor(resize(rgb, size, "pad_white")))
                names.append(name.lower())
                if limit and len(names) >= limit:
                    break
            if limit and len(names) >= limit:
                break
        if not images:
            raise DataError(f"emoji: the font at {find_font()} drew no emoji")
        self.x = torch.stack(images)                      # (N, 3, S, S)
        self.captions = names
        self.info = DataInfo(channels=3, image_size=(size, size), classes=names, captions=True)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> Item:
        return {"image": self.x[i], "label": i, "text": self.captions[i]}

    def images(self, n: int | None = None) -> torch.Tensor:
        return self.x[:n]

    def labels(self) -> torch.Tensor:
        return torch.arange(len(self))
