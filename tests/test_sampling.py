"""Contract tests of the sampler: cache equivalence (also with a decode hook), seeding, filters, allowed ranges,
guidance, stop tokens."""

import dataclasses
import math
import warnings

import pytest
import torch
from torch import Tensor

from patchgpt.model import GPT, GPTConfig
from patchgpt.sampling import DecodeHook, SamplingParams, allowed_mask, draw, sample, top_k_filter, top_p_filter
from patchgpt.sequence import IGNORE, Sequence, concat, tokens

from .reference_sampling import reference_sample

V = 24
STOP = V - 1
P = SamplingParams
PLAIN = P()


@pytest.fixture(autouse=True)
def _one_thread(_seed_and_threads):
    """Tiny models gain nothing from intra-op threads, and a busy machine makes them stall on each op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(sharp: float = 1.0, **kw) -> GPT:
    """A 2-layer random GPT; `sharp` scales the head so logits are well separated (no near-ties)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, patch_dim=12,
                    max_rows=8, max_cols=8, **kw)
    m = GPT(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharp)
    return m


class FixedLogits(GPT):
    """A GPT whose next-token logits are a fixed vector, whatever the input."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=128, vocab_size=logits.numel()))
        self.register_buffer("fixed", logits.float())
        self.eval()

    def logits(self, hidden: Tensor) -> Tensor:
        return self.fixed.expand(*hidden.shape[:-1], -1)


def prompt(B=3, T=4, prefix_len=0, patches=False) -> Sequence:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, T), generator=g)
    seq = tokens(ids).with_prefix(prefix_len)
    if patches:  # a class token followed by patch inputs with grid positions
        pos = torch.randint(1, 5, (B, T, 3), generator=g)
        pos[:, 0] = 0
        is_patch = torch.ones(B, T, dtype=torch.bool)
        is_patch[:, 0] = False
        seq = Sequence(ids=ids, labels=seq.labels, pos=pos, patches=torch.randn(B, T, 12, generator=g),
                       is_patch=is_patch, prefix_len=prefix_len)
    return seq


def grid(steps: int, cols: int = 4) -> Tensor:
    t = torch.arange(steps)
    return torch.stack([torch.ones_like(t), t // cols + 1, t % cols + 1], dim=1)


def run(m, p, steps=12, params=PLAIN, seed=0, fn=sample, **kw) -> Tensor:
    """`sample` (or, with ``fn=reference_sample``, the uncached reference) with a freshly seeded generator."""
    return fn(m, p, steps, params, generator=torch.Generator().manual_seed(seed), **kw)


def stop_after(first: int, only: int):
    """Allowed ids per step: anything but STOP before step `first`, anything until `only`, then only STOP."""
    return lambda t: [range(0, STOP)] if t < first else [range(0, V)] if t < only else [range(STOP, V)]


def _batch_sizes(m: GPT) -> tuple[list[int], object]:
    sizes: list[int] = []
    # ln_f runs once per model call, prefill (`forward`) and per-token step (`decode`) alike.
    handle = m.ln_f.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    return sizes, handle


class GlimpseLike(DecodeHook):
    """Detection's hook in miniature: each fed token's grid position is computed from its sampled value, an
    input-only patch token (a "glimpse" of what the last id names) follows every third generated token, and
    STOP ends a row."""

    dynamic = True
    stop_token = STOP

    def __init__(self, steps: int, stop_check: int = 2, inject: bool = True) -> None:
        self.max_injected = steps // 3 if inject else 0
        self.stop_check = stop_check
        self.injected = 0
        self.patches = torch.randn(V, 12, generator=torch.Generator().manual_seed(3))   # one patch per id

    def position(self, history: Tensor, t: int) -> Tensor:
        last = history[:, -1:]                                                       # (B, 1)
        return torch.stack([torch.ones_like(last), last % 4 + 1, last // 4 % 4 + 1], dim=-1)   # (B, 1, 3)

    def inject(self, history: Tensor, t: int) -> Sequence | None:
        if t % 3 != 2:
            return None
        self.injected += 1
        B = history.shape[0]
        return Sequence(ids=torch.zeros(B, 1, dtype=torch.long), labels=torch.full((B, 1), IGNORE),
                        pos=self.position(history, t), patches=self.patches[history[:, -1]][:, None],
                        is_patch=torch.ones(B, 1, dtype=torch.bool))


@pytest.mark.parametrize("case", ["plain", "prefix", "grid"])
def test_cached_equals_uncached_token_for_token(case):
    m = tiny()
    p = {"plain": prompt(), "prefix": prompt(T=5, prefix_len=3, patches=True), "grid": prompt(T=1)}[case]
    kw = {"positions": grid(14)} if case == "grid" else {}
    a = run(m, p, 14, **kw)
    assert a.shape == (3, 14) and a.dtype == torch.long
    assert torch.equal(a, run(m, p, 14, fn=reference_sample, **kw))


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("params", [P(temperature=0), P(top_k=6), P(temperature=0.8, top_p=0.9)],
                         ids=["greedy", "top_k", "top_p"])
def test_cached_equals_uncached_with_a_decode_hook(params, guided):
    """Positions from sampled values, injected input-only tokens and a stop token: the KV-cache path feeds
    exactly what the full-forward reference feeds, so both pick the same tokens from the same logits."""
    m = tiny(sharp=3.0)
    p = prompt(T=5, prefix_len=3, patches=True)
    kw = {"positions": grid(15), "allowed": stop_after(5, 11), "return_logits": True}
    if guided:
        params = dataclasses.replace(params, cfg_scale=1.5)
        kw["uncond_prompt"] = Sequence(ids=torch.zeros_like(p.ids), labels=p.labels, pos=p.pos, patches=p.patches,
                                       is_patch=p.is_patch, prefix_len=p.prefix_len)
    hook = GlimpseLike(15)
    ids, logits = run(m, p, 15, params, hook=hook, **kw)
    ref_ids, ref_logits = run(m, p, 15, params, fn=reference_sample, hook=GlimpseLike(15), **kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert hook.injected == 3                     # after steps 2, 5, 8; at 11 every row has stopped: the end
    assert (ids[:, 11:] == STOP).all() and not (ids[:, :5] == STOP).any()
    plain_ids, _ = run(m, p, 15, params, **kw)    # the hook does change what is fed
    assert not torch.equal(ids[:, :11], plain_ids[:, :11])


def test_stop_token_ends_rows_and_the_call():
    class Stop(DecodeHook):
        stop_token, stop_check = STOP, 3

    m = tiny(sharp=3.0)
    p = prompt(B=6)
    allowed = lambda t: [range(0, STOP)] if t < 2 else [range(STOP - 2, V)] if t < 8 else [range(STOP, V)]
    sizes, h = _batch_sizes(m)
    out = run(m, p, 20, hook=Stop(), allowed=allowed)
    h.remove()
    assert out.shape == (6, 20)
    assert len(sizes) == 1 + 8                    # all rows stopped at step 8 at the latest; checked at t + 1 = 9
    first = (out == STOP).int().argmax(dim=1)     # (B,) the step each row stopped at
    assert len(set(first.tolist())) > 1 and (first <= 8).all()
    assert torch.equal(out == STOP, torch.arange(20) >= first[:, None])   # a stopped row reads STOP
    plain = run(m, p, 20, allowed=allowed)        # the same draws, only recorded differently
    for b, f in enumerate(first.tolist()):
        assert torch.equal(out[b, :f + 1], plain[b, :f + 1])
    assert torch.equal(out, run(m, p, 20, hook=Stop(), allowed=allowed, fn=reference_sample))


def _count_position_embeddings(m: GPT) -> list[int]:
    calls: list[int] = []
    inner = m.position_embedding
    m.position_embedding = lambda pos, t: calls.append(1) or inner(pos, t)
    return calls


def test_the_hook_states_whether_positions_are_fixed():
    class Static(DecodeHook):
        stop_token = STOP

        def position(self, history, t):
            raise AssertionError("`position` of a hook that is not dynamic is never called")

        def inject(self, history, t):
            raise AssertionError("`inject` with max_injected=0 is never called")

    m = tiny()
    p, pos = prompt(), grid(12)
    calls = _count_position_embeddings(m)
    a = run(m, p, 12, positions=pos, hook=Static(), allowed=[range(0, STOP)])
    assert len(calls) == 2                        # the prefill, then one table for all fed tokens
    assert torch.equal(a, run(m, p, 12, positions=pos, allowed=[range(0, STOP)]))
    calls.clear()
    run(m, p, 12, positions=pos, hook=GlimpseLike(12, inject=False), allowed=[range(0, STOP)])
    assert len(calls) == 1 + 11                   # dynamic: each fed token's position is embedded when known


def test_seeding_is_reproducible():
    m = tiny()
    p = prompt()
    assert torch.equal(run(m, p, seed=3), run(m, p, seed=3))
    assert not torch.equal(run(m, p, seed=3), run(m, p, seed=4))


def test_greedy_is_deterministic_and_the_argmax_of_the_full_forward():
    m = tiny(sharp=30.0)
    p = prompt(T=5, prefix_len=2, patches=True)
    pos = grid(10)
    a = sample(m, p, 10, P(temperature=0), positions=pos)
    assert torch.equal(a, sample(m, p, 10, P(temperature=0), positions=pos, generator=torch.Generator()))
    assert torch.equal(a, reference_sample(m, p, 10, P(temperature=0), positions=pos))
    # Teacher-force prompt + generated tokens through one full forward: each token is the argmax before it.
    gen = Sequence(ids=a[:, :-1], labels=torch.full_like(a[:, :-1], IGNORE),
                   pos=pos[:-1].expand(3, -1, -1))
    with torch.no_grad():
        logits = m.logits(m(concat(p, gen, prefix_len=p.prefix_len)))[:, p.shape[1] - 1:]
    assert torch.equal(logits.argmax(-1), a)


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(40_000, 1)
    probs[1::2] *= 3.0                                   # unnormalised rows draw the same way
    ids = draw(probs, torch.Generator().manual_seed(0))
    assert ids.shape == (40_000, 1) and ids.dtype == torch.long
    freq = torch.bincount(ids[:, 0], minlength=6) / 40_000
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0]), atol=0.01, rtol=0)
    # One-hot rows, and a row whose only mass is on the last id.
    eye = torch.eye(6)
    assert torch.equal(draw(eye, torch.Generator().manual_seed(1))[:, 0], torch.arange(6))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(draw(probs[:100], g1), draw(probs[:100], g2))


def test_non_finite_logits_are_a_clear_error():
    m = tiny()
    with torch.no_grad():
        m.lm_head.weight[3].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        run(m, prompt(), 4)


def test_top_k_filter_keeps_exactly_the_k_largest():
    x = torch.randn(5, 50)
    y = top_k_filter(x, 7)
    kept = torch.isfinite(y)
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(y[kept], x[kept])
    assert (x.masked_fill(kept, -math.inf).max(-1).values < x.masked_fill(~kept, math.inf).min(-1).values).all()
    assert top_k_filter(x, 0) is x and top_k_filter(x, 50) is x


def test_top_p_filter_on_known_probabilities():
    x = torch.tensor([0.05, 0.5, 0.15, 0.25, 0.05]).log()
    finite = lambda p: torch.isfinite(top_p_filter(x, p)).nonzero().flatten().tolist()
    assert finite(0.7) == [1, 3]           # 0.5 + 0.25 >= 0.7
    assert finite(0.8) == [1, 2, 3]        # 0.9 >= 0.8
    assert finite(0.3) == [1] and finite(0.0) == [1]  # the top token is always kept
    assert top_p_filter(x, 1.0) is x
    assert torch.equal(top_p_filter(x[None].expand(2, -1), 0.7), top_p_filter(x, 0.7).expand(2, -1))


def test_sampling_with_top_k_and_top_p_never_emits_filtered_tokens():
    probs = torch.tensor([0.02, 0.3, 0.03, 0.25, 0.2, 0.1, 0.05, 0.05])
    m = FixedLogits(probs.log())
    p = tokens(torch.zeros(400, 1, dtype=torch.long))
    k = run(m, p, 6, P(top_k=3))                   # 2400 draws each
    assert set(k.unique().tolist()) == {1, 3, 4}
    n = run(m, p, 6, P(top_p=0.7))                 # 0.3 + 0.25 + 0.2 = 0.75 >= 0.7
    assert set(n.unique().tolist()) == {1, 3, 4}
    both = run(m, p, 6, P(top_k=3, top_p=0.5))     # of the top 3, renormalised: 0.4 + 0.33 >= 0.5
    assert set(both.unique().tolist()) == {1, 3}
    assert torch.equal(run(m, p, 3, P(top_k=1)), torch.ones(400, 3, dtype=torch.long))


def test_top_k_1_equals_greedy():
    m = tiny()
    p = prompt(T=3, prefix_len=2)
    assert torch.equal(run(m, p, 10, P(top_k=1)), sample(m, p, 10, P(temperature=0)))
    assert torch.equal(run(m, p, 10, P(temperature=0.5, top_k=1)), sample(m, p, 10, P(temperature=0)))


def test_allowed_mask():
    assert allowed_mask(10, [range(2, 4), range(8, 20)], "cpu").nonzero().flatten().tolist() == [2, 3, 8, 9]
    assert allowed_mask(10, [range(0, 10, 4)], "cpu").nonzero().flatten().tolist() == [0, 4, 8]
    assert not allowed_mask(10, [], "cpu").any()


def test_allowed_ranges_are_respected():
    m = tiny(sharp=5.0)
    p = prompt(B=8)
    even, odd = [range(0, 4), range(20, 24)], [range(10, 13)]
    out = run(m, p, 16, allowed=lambda t: even if t % 2 == 0 else odd)
    assert out[:, 0::2].lt(4).logical_or(out[:, 0::2].ge(20)).all()
    assert out[:, 1::2].ge(10).logical_and(out[:, 1::2].lt(13)).all()
    assert torch.equal(out, run(m, p, 16, allowed=lambda t: even if t % 2 == 0 else odd, fn=reference_sample))
    fixed = run(m, p, 16, P(top_k=4), allowed=[range(5, 7)])
    assert fixed.ge(5).logical_and(fixed.lt(7)).all()
    greedy = sample(m, p, 6, P(temperature=0), allowed=[range(5, 7)])
    assert greedy.ge(5).logical_and(greedy.lt(7)).all()
    with pytest.raises(ValueError, match="no id"):
        run(m, p, 2, allowed=[range(V, V + 3)])


def test_cfg_scale_zero_is_plain_conditional_sampling():
    m = tiny()
    p = prompt(T=2, prefix_len=2)
    u = Sequence(ids=p.ids.clone().fill_(0), labels=p.labels, pos=p.pos, prefix_len=2)
    sizes, h = _batch_sizes(m)
    out = run(m, p, 10, P(cfg_scale=0.0), uncond_prompt=u)
    h.remove()
    assert set(sizes) == {3}                  # no doubled batch at all
    assert torch.equal(out, run(m, p, 10))


def test_cfg_runs_one_doubled_batch_and_guides():
    m = tiny(sharp=5.0)
    p = prompt(T=2, prefix_len=2)
    u = Sequence(ids=torch.zeros_like(p.ids), labels=p.labels, pos=p.pos, prefix_len=2)
    sizes, h = _batch_sizes(m)
    guided = run(m, p, 10, P(cfg_scale=1e4), uncond_prompt=u)
    h.remove()
    assert set(sizes) == {6} and len(sizes) == 10  # prefill + 9 one-token steps, all 2B rows
    assert not torch.equal(guided, run(m, p, 10))
    assert torch.equal(guided, run(m, p, 10, P(cfg_scale=1e4), uncond_prompt=u, fn=reference_sample))
    # With a huge scale the guided logits are dominated by cond - uncond: greedy on that difference.
    greedy = sample(m, p, 10, P(temperature=0, cfg_scale=1e4), uncond_prompt=u)
    assert torch.equal(greedy, reference_sample(m, p, 10, P(temperature=0, cfg_scale=1e4), uncond_prompt=u))


def test_edge_cases():
    m = tiny()
    p = prompt()
    assert run(m, p, 0).shape == (3, 0)
    with pytest.raises(ValueError, match="positions"):
        run(m, p, 4, positions=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        P(temperature=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        P().top_k = 3
    with pytest.raises(ValueError, match="uncond_prompt"):
        run(m, p, 4, P(cfg_scale=1.0), uncond_prompt=prompt(B=2))
    with pytest.raises(ValueError, match="block_size"):
        run(m, p, m.cfg.block_size, positions=torch.zeros(m.cfg.block_size, 3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_sampling_equals_eager_sampling():
    m = tiny(sharp=3.0).cuda()
    p = prompt(T=2, prefix_len=2)
    p = Sequence(ids=p.ids.cuda(), labels=p.labels.cuda(), pos=p.pos.cuda(), prefix_len=2)
    u = Sequence(ids=torch.zeros_like(p.ids), labels=p.labels, pos=p.pos, prefix_len=2)
    pos = grid(12).cuda()
    for params in (P(temperature=0.0), P(top_k=5), P(cfg_scale=2.0)):
        a = sample(m, p, 12, params, positions=pos, uncond_prompt=u, generator=torch.Generator("cuda").manual_seed(0))
        b = sample(m, p, 12, params, positions=pos, uncond_prompt=u, generator=torch.Generator("cuda").manual_seed(0),
                   cuda_graph=False)
        assert torch.equal(a, b), params
    with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16):
        warnings.simplefilter("error")      # the graph is recorded under autocast too (no eager fallback)
        assert sample(m, p, 12, P(temperature=0.0), positions=pos).shape == (3, 12)
