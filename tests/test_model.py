"""Contract tests of the backbone: causality, the prefix mask, the KV cache, sizes."""

import pytest
import torch

from patchgpt.model import GPT, SIZES, GPTConfig, attention_mask
from patchgpt.sequence import IGNORE, Sequence, Vocab, concat, tokens
from patchgpt.tokenizers import Patches


def tiny(**kw) -> GPT:
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=20, patch_dim=12,
                    max_rows=8, max_cols=8, **kw)
    return GPT(cfg).eval()


def mixed_seq(B=2, T=12, prefix_len=0) -> Sequence:
    """Ids and patches interleaved, with grid positions — every input path of the model."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (B, T), generator=g)
    patches = torch.randn(B, T, 12, generator=g)
    is_patch = torch.rand(B, T, generator=g) < 0.5
    pos = torch.randint(0, 5, (B, T, 3), generator=g)
    return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=pos, patches=patches, is_patch=is_patch,
                    prefix_len=prefix_len)


def perturb_from(seq: Sequence, t: int) -> Sequence:
    ids = seq.ids.clone()
    ids[:, t:] = (ids[:, t:] + 3) % 20
    patches = seq.patches.clone()
    patches[:, t:] += 5.0
    return Sequence(ids=ids, labels=seq.labels, pos=seq.pos, patches=patches, is_patch=seq.is_patch,
                    prefix_len=seq.prefix_len)


@pytest.mark.parametrize("t", [1, 5, 11])
def test_causal_outputs_do_not_see_the_future(t):
    m = tiny()
    seq = mixed_seq()
    a, b = m(seq), m(perturb_from(seq, t))
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_prefix_is_bidirectional_and_the_rest_causal():
    m = tiny()
    P = 6
    seq = mixed_seq(prefix_len=P)
    # Changing the last prefix token changes every prefix position's output...
    changed = m(perturb_from(seq, P - 1))
    base = m(seq)
    assert not torch.allclose(base[:, 0], changed[:, 0])
    # ...while changing a token after the prefix changes nothing before it.
    after = m(perturb_from(seq, P + 2))
    torch.testing.assert_close(base[:, :P + 2], after[:, :P + 2])


def test_attention_mask_shape_and_values():
    mask, causal = attention_mask(5, 5, 0, 3, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert not causal and torch.equal(mask, expected)
    assert attention_mask(5, 5, 0, 0, torch.device("cpu")) == (None, True)
    assert attention_mask(5, 5, 0, 5, torch.device("cpu")) == (None, False)


@pytest.mark.parametrize("prefix_len", [0, 4])
def test_kv_cache_equals_full_forward(prefix_len):
    m = tiny()
    seq = mixed_seq(T=14, prefix_len=prefix_len)
    full = m(seq)
    cache = m.new_cache(batch_size=2, max_len=20)
    first = max(1, prefix_len)
    chunks = [m(_slice(seq, 0, first), cache=cache)]
    for t in range(first, 14):
        chunks.append(m(_slice(seq, t, t + 1), cache=cache))
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 14


@pytest.mark.parametrize("bias,autocast", [(False, False), (True, False), (False, True)])
def test_decode_equals_the_one_token_forward(bias, autocast):
    """`GPT.decode` (the sampling hot path) is the same function as `forward` on a one-token step,
    also under bf16 autocast (where its residual stream must stay fp32, as `forward`'s does)."""
    m = tiny(bias=bias)
    for p in m.parameters():  # biases start at zero: give them values so they are exercised
        p.data.normal_(0, 0.2)
    seq = mixed_seq(T=9, prefix_len=4)
    ref_cache, cache = m.new_cache(2, 12), m.new_cache(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        m(_slice(seq, 0, 6), cache=ref_cache)
        m(_slice(seq, 0, 6), cache=cache)
        for t in range(6, 9):
            step = _slice(seq, t, t + 1)
            ref = m(step, cache=ref_cache)[:, 0]                                 # (B, C)
            x = m.embed(step, offset=t)[:, 0]                                    # ids and patches
            torch.testing.assert_close(m.decode(x, cache), ref, atol=1e-5, rtol=1e-5)
            assert cache.length == ref_cache.length == t + 1
    torch.testing.assert_close(cache.k, ref_cache.k)
    torch.testing.assert_close(cache.v, ref_cache.v)
    with pytest.raises(ValueError, match="exceeds the cache"):
        for _ in range(4):
            m.decode(x, cache)


def test_fixed_shape_decode_equals_decode():
    """``decode(at=...)``, the CUDA-graph form: writes at a tensor index and masks the rest of the buffer."""
    m = tiny()
    seq = mixed_seq(T=9, prefix_len=3)
    cache, fixed = m.new_cache(2, 16), m.new_cache(2, 16)
    fixed.k.normal_(), fixed.v.normal_()            # garbage beyond the prefill must be masked out
    m(_slice(seq, 0, 5), cache=cache)
    m(_slice(seq, 0, 5), cache=fixed)
    for t in range(5, 9):
        x = m.embed(_slice(seq, t, t + 1), offset=t)[:, 0]                     # (B, C)
        torch.testing.assert_close(m.decode(x, fixed, at=torch.tensor([t])), m.decode(x, cache),
                                   atol=1e-5, rtol=1e-5)
    assert fixed.length == 5                        # with `at`, the caller keeps the length
    torch.testing.assert_close(fixed.k[:, :, :, :9], cache.k[:, :, :, :9])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 keys and values go into the fp32 cache
        assert m.decode(x, fixed, at=torch.tensor([9])).shape == (2, 32)


def test_kv_cache_chunked_prefill():
    m = tiny()
    seq = mixed_seq(T=12)
    cache = m.new_cache(2)
    out = torch.cat([m(_slice(seq, 0, 5), cache=cache), m(_slice(seq, 5, 12), cache=cache)], 1)
    torch.testing.assert_close(out, m(seq), atol=1e-5, rtol=1e-5)


def _slice(seq: Sequence, a: int, b: int) -> Sequence:
    return Sequence(ids=seq.ids[:, a:b], labels=seq.labels[:, a:b], pos=seq.pos[:, a:b],
                    patches=seq.patches[:, a:b], is_patch=seq.is_patch[:, a:b],
                    prefix_len=seq.prefix_len if a == 0 else 0)


def test_upto_returns_an_intermediate_layer():
    m = tiny()
    seq = mixed_seq()
    h1 = m(seq, upto=1)
    assert h1.shape == (2, 12, 32)
    assert not torch.allclose(h1, m(seq))


def test_too_long_sequence_is_a_clear_error():
    m = tiny()
    ids = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        m(tokens(ids))


def test_sizes_build_and_count_parameters():
    for name in ("nano", "micro"):
        cfg = GPTConfig(**SIZES[name], vocab_size=10, block_size=16)
        assert GPT(cfg).num_params() > 0
    assert list(SIZES)[0] == "nano"


def test_vocab_ranges_and_concat():
    v = Vocab()
    a, b = v.add("bos", 1), v.add("colors", 16)
    assert (a, b, v.size) == (range(0, 1), range(1, 17), 17)
    assert v.add("colors", 16) == b
    with pytest.raises(ValueError):
        v.add("colors", 8)
    assert Vocab(v.entries()).entries() == v.entries()
    p = Patches(2, 1, (4, 4), v)
    img = torch.randn(3, 1, 4, 4)
    s = concat(tokens(torch.zeros(3, 1, dtype=torch.long)), p.encode(img), prefix_len=1)
    assert s.ids.shape == (3, 5) and s.patches.shape == (3, 5, 4) and s.prefix_len == 1
    assert s.is_patch[:, 0].logical_not().all() and s.is_patch[:, 1:].all()


def test_a_compiled_backbone_decodes_without_recompiling():
    """Calls with a KV cache (prefill, injected tokens) run eagerly in a compiled backbone: each new cache
    length would otherwise be a recompile, and after 8 dynamo stops compiling the forward altogether."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = tiny()
    ref = tiny()
    ref.load_state_dict(m.state_dict())
    m.compile()
    seq = mixed_seq(T=14)
    with torch.no_grad():
        torch.testing.assert_close(m(seq), ref(seq), atol=1e-5, rtol=1e-5)
        cache = m.new_cache(2, 20)
        chunks = [m(_slice(seq, 0, 4), cache=cache)] + [m(_slice(seq, t, t + 1), cache=cache) for t in range(4, 14)]
    torch.testing.assert_close(torch.cat(chunks, 1), ref(seq), atol=1e-5, rtol=1e-5)
    assert counters["frames"]["total"] <= 2 and not counters["unimplemented"], dict(counters["frames"])
    torch._dynamo.reset()
