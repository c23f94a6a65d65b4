"""Tokenizer round trips: patchify/unpatchify, colour palettes."""

import pytest
import torch

from patchgpt.sequence import Vocab
from patchgpt.tokenizers import ColorClusters, Patches, normalize_patches
from patchgpt.tokenizers.colors import kmeans


@pytest.mark.parametrize("C,H,W,P", [(1, 8, 8, 2), (3, 32, 32, 4), (4, 12, 20, 4), (3, 6, 9, 3), (2, 8, 8, 1)])
def test_patchify_roundtrip_exact(C, H, W, P):
    tok = Patches(P, C, (H, W))
    x = torch.randn(5, C, H, W)
    p = tok.patchify(x)
    assert p.shape == (5, (H // P) * (W // P), P * P * C)
    assert torch.equal(tok.unpatchify(p), x)


def test_patch_layout_is_raster_order_row_col_channel():
    tok = Patches(2, 3, (4, 6))
    x = torch.arange(3 * 4 * 6, dtype=torch.float).reshape(1, 3, 4, 6)
    p = tok.patchify(x)
    # Patch 1 is the top row's second patch: rows 0-1, cols 2-3; its first value is (row 0, col 2, ch 0).
    assert p[0, 1, 0] == x[0, 0, 0, 2] and p[0, 1, 1] == x[0, 1, 0, 2] and p[0, 1, 3] == x[0, 0, 0, 3]
    assert p[0, 3, 0] == x[0, 0, 2, 0]  # patch 3 starts the second row of patches


def test_patches_encode_sequence():
    v = Vocab()
    tok = Patches(2, 1, (4, 6), v)
    s = tok.encode(torch.zeros(2, 1, 4, 6))
    assert s.ids.shape == (2, 6) and (s.ids == v["patch"].start).all()
    assert s.pos[0, :, 1].tolist() == [1, 1, 1, 2, 2, 2] and s.pos[0, :, 2].tolist() == [1, 2, 3, 1, 2, 3]
    assert torch.equal(tok.decode(s), torch.zeros(2, 1, 4, 6))


def test_non_multiple_size_is_an_error():
    with pytest.raises(ValueError, match="does not divide the 8x8 images; choose one of 1, 2, 4, 8"):
        Patches(3, 1, (8, 8))


def test_normalize_patches():
    p = torch.randn(2, 5, 12) * 3 + 1
    n = normalize_patches(p)
    torch.testing.assert_close(n.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)


def test_palette_roundtrip_exact_on_palette_images():
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(6, 3, generator=g) * 2 - 1
    idx = torch.randint(0, 6, (10, 5 * 7), generator=g)
    images = palette[idx].reshape(10, 5, 7, 3).permute(0, 3, 1, 2)
    v = Vocab()
    v.add("bos", 1)
    tok = ColorClusters(6, 3, (5, 7), v).fit(images)
    assert tok.fitted
    seq = tok.encode(images)
    assert seq.ids.min() >= 1 and seq.ids.max() < 7
    torch.testing.assert_close(tok.decode(seq), images)
    # Re-encoding decoded images gives the same tokens.
    assert torch.equal(tok.encode(tok.decode(seq)).ids, seq.ids)


def test_quantize_picks_nearest_colour():
    tok = ColorClusters(2, 1, (1, 2), palette=torch.tensor([[-1.0], [1.0]]))
    x = torch.tensor([[[[-0.2, 0.3]]]])
    assert tok.quantize(x).tolist() == [[0, 1]]


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(100, 2, generator=g) for c in centres])
    found = kmeans(x, 3, seed=1)
    d = torch.cdist(centres, found).min(dim=1).values
    assert (d < 0.1).all()
