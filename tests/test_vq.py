"""VQ-VAE tokenizer: shapes, code ranges, straight-through gradients, codebook updates, dead-code restarts,
and a short training run on scikit-learn's digits."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from patchgpt.sequence import IGNORE, Sequence, Vocab
from patchgpt.tokenizers.vq import VQVAE, VQCodes, VQConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread avoids oversubscription on a shared CPU (much faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(channels: int = 1, image_size=8, downsample: int = 2, **kw) -> VQVAE:
    kw = {"hidden": 8, "codebook_size": 16, "code_dim": 8, **kw}
    return VQVAE(VQConfig(channels=channels, image_size=image_size, downsample=downsample, **kw))


@pytest.mark.parametrize("C,size,d,l2", [(1, 8, 2, True), (3, 32, 4, True), (3, (16, 24), 4, False),
                                         (1, (16, 24), 8, True)])
def test_encode_decode_shapes_and_code_range(C, size, d, l2):
    vq = tiny(C, size, d, l2_norm=l2)
    H, W = (size, size) if isinstance(size, int) else size
    x = torch.rand(3, C, H, W) * 2 - 1
    codes = vq.encode_codes(x)
    assert codes.shape == (3, H // d, W // d) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < vq.config.codebook_size
    assert vq.decode_codes(codes).shape == (3, C, H, W)
    recon, loss, stats = vq(x)
    assert recon.shape == x.shape and loss.ndim == 0 and torch.isfinite(loss)
    assert set(stats) >= {"mse", "psnr", "usage", "perplexity", "restarted"}
    assert 0 < stats["usage"] <= 1 and 1 <= stats["perplexity"] <= vq.config.codebook_size + 1e-4


def test_config_roundtrip_and_validation():
    cfg = VQConfig(channels=3, image_size=(16, 24), downsample=8, codebook_size=64)
    assert VQConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["image_size"] == [16, 24]
    assert VQConfig(channels=1, image_size=8).image_size == (8, 8)
    with pytest.raises(ValueError):
        VQConfig(channels=1, image_size=8, downsample=3)
    with pytest.raises(ValueError):
        VQConfig(channels=1, image_size=12, downsample=8)


def test_vqcodes_sequence_in_vocab_range_and_roundtrip_shape():
    v = Vocab([("colors", 16)])
    tok = VQCodes(tiny(3, (16, 24), 4), v)
    assert tok.ids == range(16, 32) and v.size == 32 and tok.grid == (4, 6) and tok.num_patches == 24
    assert tok.fitted and tok.channels == 3 and tok.image_size == (16, 24)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    seq = tok.encode(x)
    assert seq.ids.shape == (2, 24) and seq.pos.shape == (2, 24, 3)
    assert int(seq.ids.min()) >= 16 and int(seq.ids.max()) < 32
    assert (seq.labels == IGNORE).all()
    assert seq.pos[0, 0].tolist() == [1, 1, 1] and seq.pos[0, 7].tolist() == [1, 2, 2]  # raster order
    codes = tok.vq.encode_codes(x)
    assert torch.equal(seq.ids - 16, codes.reshape(2, 24))
    out = tok.decode(seq)
    assert isinstance(seq, Sequence) and out.shape == x.shape and out.abs().max() <= 1
    assert torch.equal(out, tok.decode(seq.ids))
    assert any(k.startswith("vq.") for k in tok.state_dict())  # the VQ-VAE saves with the tokenizer


def test_straight_through_gradient_reaches_encoder():
    vq = tiny()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    recon, _, _ = vq(x)
    F.mse_loss(recon, x).backward()  # reconstruction only: the encoder is reached through the straight-through path
    first = vq.encoder[0].weight.grad
    assert first is not None and first.abs().sum() > 0
    vq.zero_grad()
    _, loss, _ = vq(x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vq.encoder.parameters())


@pytest.mark.parametrize("l2", [True, False])
def test_codebook_loss_moves_codes_toward_encoder_outputs(l2):
    vq = tiny(l2_norm=l2)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    opt = torch.optim.SGD(vq.codebook.parameters(), lr=1.0 if l2 else 10.0)
    z = vq.encode_latents(x).detach()
    losses = []
    for _ in range(3):
        _, _, cb, _ = vq.quantize(z)
        losses.append(float(cb.detach()))
        opt.zero_grad()
        cb.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert vq.encoder[0].weight.grad is None  # the codebook loss alone leaves the encoder alone


def test_dead_codes_are_restarted():
    vq = tiny(l2_norm=False, dead_after=3)
    with torch.no_grad():
        vq.codebook.weight.fill_(1e3)
        vq.codebook.weight[0].zero_()  # every encoder output is nearest to code 0
    before = vq.codebook.weight.detach().clone()
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    vq.train()
    restarted = [vq(x)[2]["restarted"] for _ in range(5)]
    assert restarted[:3] == [0, 0, 0] and restarted[3] == 15  # codes 1..15 unused for 3 steps
    after = vq.codebook.weight.detach()
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1:], before[1:])
    assert after[1:].abs().max() < 1e3  # replaced by encoder outputs
    vq.eval()
    assert vq(x)[2]["restarted"] == 0  # no restarts outside training


def test_digits_training_beats_mean_image_and_state_dict_roundtrip():
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    train, test = x[perm[:1500]], x[perm[1500:]]
    mean_mse = float(((test - train.mean(0)) ** 2).mean())
    mean_psnr = 10 * math.log10(4 / mean_mse)

    vq = tiny(hidden=16, codebook_size=64, code_dim=16, dead_after=20)
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    t0 = time.time()
    vq.train()
    for _ in range(150):
        batch = train[torch.randint(train.shape[0], (64,), generator=g)]
        _, loss, stats = vq(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vq.eval()
    with torch.no_grad():
        recon = vq.decode_codes(vq.encode_codes(test)).clamp(-1, 1)
    vq_psnr = 10 * math.log10(4 / float(((recon - test) ** 2).mean()))
    print(f"digits: mean-image PSNR {mean_psnr:.2f} dB, VQ-VAE PSNR {vq_psnr:.2f} dB, "
          f"usage {stats['usage']:.2f}, perplexity {stats['perplexity']:.1f}, {time.time() - t0:.1f}s")
    assert vq_psnr > mean_psnr + 3.0

    clone = VQVAE(VQConfig.from_dict(vq.config.to_dict()))
    clone.load_state_dict(vq.state_dict())
    assert torch.equal(clone.encode_codes(test), vq.encode_codes(test))
    tok, tok2 = VQCodes(vq), VQCodes(VQVAE(vq.config))
    tok2.load_state_dict(tok.state_dict())
    assert torch.equal(tok2.encode(test).ids, tok.encode(test).ids)
