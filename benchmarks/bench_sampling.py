"""Sampling throughput: patchgpt's `sample` (with and without the KV cache) against Hugging Face
`GPT2LMHeadModel.generate`, on CPU.

Configuration (both models random-init, eval mode, fp32): vocab 512, width 256, 6 layers, 8 heads, MLP 4x,
batch 16, a 1-token prompt (a class token) and 256 generated tokens per row (one 16x16 image of tokens;
patchgpt gets the grid positions of each generated token). Plain multinomial sampling: temperature 1,
no top-k / top-p. HF: ``GPT2Config(n_embd=256, n_layer=6, n_head=8, n_positions=257, vocab_size=512)``,
dropouts 0, SDPA attention where available, ``generate(do_sample=True, top_k=0, top_p=1.0,
max_new_tokens=256, min_new_tokens=256)`` with pad/eos ids set (min_new_tokens masks eos, so it never stops
early) and its default dynamic cache. Note GPT-2 keeps its tanh GELU and biases; patchgpt uses erf GELU and
no biases: the comparison is of the two stacks as shipped.

Measured: tokens/s = batch * generated tokens / wall time of one whole call (prefill included), after one
warm-up call each, interleaving the implementations across repeats (rotating the order) and reporting
medians; ratios are medians of per-repeat ratios, since this machine's speed drifts. The no-cache path
recomputes the full forward every step, so its cost per step grows with the length: it is timed over the
first ``--nocache-steps`` (default 64) tokens of a fresh run, and compared with a cached run of exactly the
same number of steps. Its tokens/s over a full 256-token image would be lower still. The no-cache path is the
tests' reference sampler (``tests/reference_sampling.py``, `reference_sample`): `sample`'s arguments, its
token choice, the full forward at every step.

On CUDA (``--device cuda``) the cached path replays each step as a CUDA graph (`sample`'s default there), and
the same run without the graph is timed too.

Run: ``PYTHONPATH=. python benchmarks/bench_sampling.py [--threads 2 --repeats 5 --nocache-steps 64]``;
``--quick`` is a seconds-long smoke test; ``--json out.json`` writes the results dict.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import transformers
from common import timed, write_json
from transformers import GPT2Config, GPT2LMHeadModel

from patchgpt.model import GPT, GPTConfig
from patchgpt.quantize import quantize_int8
from patchgpt.sampling import sample
from patchgpt.sequence import tokens
from tests.reference_sampling import reference_sample

VOCAB, WIDTH, LAYERS, HEADS, BATCH, SIDE = 512, 256, 6, 8, 16, 16
STEPS = SIDE * SIDE            # 256 generated tokens per image
EOS = VOCAB - 1


def grid_positions(steps: int) -> torch.Tensor:
    """(steps, 3) (frame, row, col) + 1 of a row-major SIDE x SIDE image."""
    t = torch.arange(steps)
    return torch.stack([torch.ones_like(t), t // SIDE + 1, t % SIDE + 1], dim=1)


def build_hf() -> tuple[GPT2LMHeadModel, str]:
    kw = {"n_embd": WIDTH, "n_layer": LAYERS, "n_head": HEADS, "n_positions": STEPS + 1, "vocab_size": VOCAB,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": EOS,
          "pad_token_id": EOS}
    try:
        hf = GPT2LMHeadModel(GPT2Config(**kw, attn_implementation="sdpa"))
    except (ValueError, TypeError, ImportError):
        hf = GPT2LMHeadModel(GPT2Config(**kw))
    return hf.eval(), hf.config._attn_implementation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nocache-steps", type=int, default=64, help="tokens over which the no-cache path is timed")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, 32 tokens (no-cache: 8)")
    ap.add_argument("--json", type=str, default=None, help="write the results dict here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps, nc_steps = STEPS, min(args.nocache_steps, STEPS)
    if args.quick:
        args.repeats, steps, nc_steps = 2, 32, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()

    ours = GPT(GPTConfig(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, vocab_size=VOCAB, block_size=STEPS + 1,
                         max_rows=SIDE, max_cols=SIDE)).eval().to(dev)
    hf, attn_impl = build_hf()
    hf.to(dev)
    prompt = tokens(torch.zeros(BATCH, 1, dtype=torch.long, device=dev))
    pos = grid_positions(steps).to(dev)
    ids = prompt.ids
    gen_kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                  max_new_tokens=steps, min_new_tokens=steps, pad_token_id=EOS, eos_token_id=EOS)
    seed = iter(range(10**6))

    def ours_run(n: int, use_cache: bool, graph: bool = True) -> torch.Tensor:
        fn = sample if use_cache else reference_sample
        return fn(ours, prompt, n, positions=pos[:n], cuda_graph=graph,
                  generator=torch.Generator(dev).manual_seed(next(seed)))

    def hf_run() -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(ids, **gen_kw)

    runs = {  # name: (call, tokens generated per row)
        "patchgpt cache": (lambda: ours_run(steps, True), steps),
        "hf generate": (hf_run, steps),
        f"patchgpt cache ({nc_steps})": (lambda: ours_run(nc_steps, True), nc_steps),
        f"patchgpt no-cache ({nc_steps})": (lambda: ours_run(nc_steps, False), nc_steps),
    }
    if dev.type == "cuda":  # the same cached sampling with every step launched eagerly (no CUDA graph)
        runs["patchgpt cache, no graph"] = (lambda: ours_run(steps, True, graph=False), steps)
    if dev.type == "cpu":  # the opt-in int8 weights (patchgpt.quantize): a quarter of the bytes per step
        int8 = quantize_int8(ours)
        runs["patchgpt cache, int8"] = (lambda: sample(int8, prompt, steps, positions=pos[:steps],
                                                       generator=torch.Generator(dev).manual_seed(next(seed))), steps)
        int8_bf16 = quantize_int8(ours, torch.bfloat16)
        runs["patchgpt cache, int8, bf16 kv"] = (lambda: sample(int8_bf16, prompt, steps, positions=pos[:steps],
                                                                generator=torch.Generator(dev).manual_seed(
                                                                    next(seed))), steps)
    # Warm-up, and the checks that make the numbers mean something.
    assert hf_run().shape == (BATCH, steps + 1), "HF generate stopped early"
    assert ours_run(steps, True).shape == (BATCH, steps)
    g = lambda: torch.Generator(dev).manual_seed(1234)
    same = torch.equal(sample(ours, prompt, nc_steps, positions=pos[:nc_steps], generator=g()),
                       reference_sample(ours, prompt, nc_steps, positions=pos[:nc_steps], generator=g()))
    print(f"warm-up done; cached == uncached tokens over {nc_steps} steps (same seed): {same}", flush=True)

    secs: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            secs[name].append(timed(lambda f=runs[name][0]: (f(), sync())))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    tps = {n: [BATCH * runs[n][1] / s for s in v] for n, v in secs.items()}
    med = {n: statistics.median(v) for n, v in tps.items()}
    ms_step = {n: 1e3 * statistics.median(secs[n]) / runs[n][1] for n in runs}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(tps[a], tps[b], strict=True))
    c_nc, nc = names[2], names[3]
    ratios = {"patchgpt_cache_over_hf": ratio(names[0], names[1]),
              f"cache_over_nocache_first_{nc_steps}": ratio(c_nc, nc)}
    if dev.type == "cpu":
        ratios["int8_over_hf"] = ratio("patchgpt cache, int8", names[1])
        ratios["int8_over_fp32"] = ratio("patchgpt cache, int8", names[0])
        ratios["int8_bf16kv_over_hf"] = ratio("patchgpt cache, int8, bf16 kv", names[1])
    if dev.type == "cuda":
        ratios["graph_over_no_graph"] = ratio(names[0], "patchgpt cache, no graph")
        ratios["no_graph_over_hf"] = ratio("patchgpt cache, no graph", names[1])
    res = {"device": args.device, "threads": args.threads, "repeats": args.repeats, "batch": BATCH, "steps": steps,
           "nocache_steps": nc_steps, "torch": torch.__version__, "transformers": transformers.__version__,
           "machine": platform.machine(), "hf_attn_implementation": attn_impl,
           "params": {"patchgpt": ours.num_params(), "hf": sum(p.numel() for p in hf.parameters())},
           "cached_equals_uncached": same, "median_tokens_per_s": med, "median_ms_per_step": ms_step,
           "ratios": ratios, "tokens_per_s": tps, "seconds": secs}

    print(f"\n{args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads={args.threads}, "
          f"batch={BATCH}, prompt 1 token, vocab {VOCAB}, width {WIDTH}, {LAYERS} layers, {HEADS} heads, fp32, "
          f"{args.repeats} repeats, HF attention: {attn_impl}")
    print(f"\n{'(medians)':30}{'measured':>24}{'tokens/s':>11}{'ms/step':>10}")
    for n in names:
        what = f"{runs[n][1]} tokens x {BATCH} rows"
        print(f"{n:30}{what:>24}{med[n]:11.0f}{ms_step[n]:10.2f}")
    print(f"\npatchgpt cache / hf generate ({steps} tokens):          {ratios['patchgpt_cache_over_hf']:.2f}x")
    print(f"patchgpt cache / no-cache (first {nc_steps} tokens, both): "
          f"{ratios[f'cache_over_nocache_first_{nc_steps}']:.2f}x")
    if dev.type == "cpu":
        print(f"patchgpt cache, int8 / hf generate:                {ratios['int8_over_hf']:.2f}x")
        print(f"patchgpt cache, int8 / fp32:                       {ratios['int8_over_fp32']:.2f}x")
        print(f"patchgpt cache, int8 + bf16 kv / hf generate:      {ratios['int8_bf16kv_over_hf']:.2f}x")
    if dev.type == "cuda":
        print(f"patchgpt cache, CUDA graph / eager steps:          {ratios['graph_over_no_graph']:.2f}x")
        print(f"patchgpt cache, eager steps / hf generate:         {ratios['no_graph_over_hf']:.2f}x")
    print("(ratios: median of per-repeat ratios; ms/step = whole call incl. prefill / tokens; the no-cache "
          f"path was timed only over the first {nc_steps} tokens of a fresh run — over all {STEPS} it is slower "
          "per token, its step cost grows with length)")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
