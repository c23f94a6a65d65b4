"""iGPT: patchgpt's `GPT` against Hugging Face `ImageGPTForCausalImageModeling`, training and sampling.

Task: 32x32 images of colour-cluster ids, 1024 pixel tokens after one start-of-sequence token (id 512);
vocab 513 (512 clusters + sos), width 256, 4 layers, 8 heads, MLP 4x, fp32, both random-init, dropouts 0.
HF: ``ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=256, n_layer=4, n_head=8, *_pdrop=0)``; its
attention is its own ``ImageGPTAttention._attn`` (matmul, tril mask, softmax: the (B, H, T, T) matrix is
materialised; ``attn_implementation`` is not consulted). patchgpt: ``GPTConfig(n_layer=4, n_head=8, n_embd=256,
vocab_size=513, block_size=1025, max_rows=32, max_cols=32)``, SDPA attention, grid (row, col) positions on
the pixel tokens (precomputed). The stacks are compared as shipped: ImageGPT keeps quick-GELU, biases, an
RMS-style LayerNorm and a 512-way head (the sos id cannot be predicted); patchgpt has erf GELU, no biases and
a 513-way head (sampling masks the sos id with ``allowed``).

1. Training step, batch 8: input [sos] + pixels 0..1022 (1024 positions). ImageGPT's loss shifts the labels
   inside the model (``logits[:, :-1]`` against ``labels[:, 1:]``), so with n_positions=1024 it makes 1023
   predictions; patchgpt gets the same job: logits at all 1024 positions, cross-entropy over the first 1023
   (targets pixels 0..1022). Then backward, AdamW step, zero_grad. Reported: images/s.
2. Sampling, batch 8: from the sos token, 1024 tokens (temperature 1, no top-k/top-p). patchgpt:
   ``sample(..., allowed=[range(0, 512)])`` (preallocated KV cache); HF: ``generate(do_sample=True,
   top_k=0, max_length=1025, min_length=1025, eos_token_id=None, pad_token_id=0)`` with its default dynamic
   cache. Reported: images/s and tokens/s of one whole call (prefill included).

After warm-up (3 training steps, one sampling call each), the two models are interleaved across repeats
(alternating which goes first) and medians are reported; ratios are medians of per-repeat ratios, since this
machine's speed drifts.

Run: ``PYTHONPATH=. python benchmarks/bench_imagegpt.py [--threads 2 --repeats 5 --sample-repeats 3]``
(``--device cuda``: the same on the GPU, timings synchronised; ``--bf16``: both models under bf16 autocast);
``--quick`` is a seconds-long smoke test (batch 2, 256-token training rows, 32 sampled tokens, 2 repeats);
``--json out.json`` writes the results dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import platform
import statistics

import torch
import torch.nn.functional as F
import transformers
from common import timed, write_json
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling
from transformers.models.imagegpt.modeling_imagegpt import ImageGPTAttention

from patchgpt.model import GPT, GPTConfig
from patchgpt.quantize import quantize_int8
from patchgpt.sampling import SamplingParams, sample
from patchgpt.sequence import IGNORE, tokens
from patchgpt.tokenizers.patches import grid_positions

VOCAB, WIDTH, LAYERS, HEADS, SIDE = 513, 256, 4, 8, 32
PIXELS = SIDE * SIDE            # 1024
SOS = VOCAB - 1                 # 512; ImageGPT's start-of-sequence id
PAD = 0                         # never used (no eos); must not be SOS, or generate masks the prompt out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed training repeats (1 step each)")
    ap.add_argument("--sample-repeats", type=int, default=3, help="timed sampling repeats (1 call each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 2, 256-token rows, 32 sampled tokens")
    ap.add_argument("--json", type=str, default=None, help="write the results dict here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    ap.add_argument("--bf16", action="store_true", help="both models under bf16 autocast (training and sampling)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)
    T, steps, warmup = PIXELS, PIXELS, 3         # training input positions, sampled tokens per row
    if args.quick:
        args.repeats, args.sample_repeats, args.batch, T, steps, warmup = 2, 2, 2, 256, 32, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = args.batch

    ours = GPT(GPTConfig(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, vocab_size=VOCAB, block_size=PIXELS + 1,
                         max_rows=SIDE, max_cols=SIDE)).to(dev)
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=VOCAB, n_positions=PIXELS, n_embd=WIDTH,
                                                       n_layer=LAYERS, n_head=HEADS, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, attn_pdrop=0.0)).to(dev)
    attn_impl = hf.config._attn_implementation
    materialised = ("torch.matmul(query, key.transpose(-1, -2))" in inspect.getsource(ImageGPTAttention._attn)
                    and "attention_interface" not in inspect.getsource(ImageGPTAttention.forward))

    # Training inputs: [sos] + pixels 0..T-2; position t predicts pixel t; the last position's prediction
    # is dropped by both (ImageGPT's internal label shift), leaving T - 1 predictions per row.
    pixels = torch.randint(0, SOS, (B, T))
    x = torch.cat([torch.full((B, 1), SOS), pixels[:, :-1]], dim=1)                # (B, T)
    grid = grid_positions(1, SIDE, SIDE)                                            # (1024, 3)
    pos = torch.cat([torch.zeros(1, 3, dtype=torch.long), grid[:T - 1]])[None].expand(B, T, 3)
    labels = torch.cat([pixels[:, :-1], torch.full((B, 1), IGNORE)], dim=1)
    x, labels, pos, grid = x.to(dev), labels.to(dev), pos.to(dev), grid.to(dev)
    seq = dataclasses.replace(tokens(x, labels), pos=pos)
    targets = seq.labels[:, :-1].reshape(-1)

    def ours_loss() -> torch.Tensor:
        logits = ours.logits(ours(seq))                                             # (B, T, 513)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets)

    def hf_loss() -> torch.Tensor:
        return hf(input_ids=x, labels=x, use_cache=False).loss                     # (B, T, 512) inside

    # Sampling: one sos token per row, `steps` pixel tokens.
    sos = torch.full((B, 1), SOS, device=dev)
    prompt, gen = tokens(sos), torch.Generator(dev).manual_seed(0)

    def ours_sample() -> torch.Tensor:
        return sample(ours, prompt, steps, SamplingParams(temperature=1.0, top_k=0), positions=grid[:steps],
                      generator=gen, allowed=[range(0, SOS)])

    def hf_sample() -> torch.Tensor:
        return hf.generate(input_ids=sos, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                           max_length=1 + steps, min_length=1 + steps, eos_token_id=None, pad_token_id=PAD)

    models = {"patchgpt": (ours, ours_loss, ours_sample), "hf_imagegpt": (hf, hf_loss, hf_sample)}
    train, samp = {}, {}
    for name, (model, loss_fn, sample_fn) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(m=model, f=loss_fn, o=opt) -> None:
            m.train()
            with amp():
                loss = f()
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

        def run_sample(m=model, f=sample_fn) -> None:
            m.eval()
            with amp():
                out = f()
            assert out.shape[-1] in (steps, 1 + steps) and int(out[:, -steps:].max()) < SOS, out.shape

        train[name], samp[name] = step, run_sample
        with torch.no_grad():
            assert torch.isfinite(loss_fn()), name
        for _ in range(warmup):
            step()
        run_sample()

    if dev.type == "cpu" and not args.bf16:  # the opt-in int8 weights (patchgpt.quantize), sampling only
        int8 = quantize_int8(ours)
        samp["patchgpt_int8"] = lambda: sample(int8, prompt, steps, SamplingParams(temperature=1.0, top_k=0),
                                               positions=grid[:steps], generator=gen, allowed=[range(0, SOS)])
        samp["patchgpt_int8"]()
    samples = {n: {"train": [], "sample": []} for n in samp}
    for r in range(args.repeats):
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            sync()
            samples[name]["train"].append(B / timed(lambda f=train[name]: (f(), sync())))
    for r in range(args.sample_repeats):
        for name in list(samp) if r % 2 == 0 else list(samp)[::-1]:
            sync()
            samples[name]["sample"].append(B / timed(lambda f=samp[name]: (f(), sync())))
        print(f"sampling repeat {r + 1}/{args.sample_repeats} done", flush=True)
    if "patchgpt_int8" in samples:
        int8_ratio = statistics.median(a / b for a, b in zip(samples["patchgpt_int8"]["sample"],
                                                             samples["hf_imagegpt"]["sample"], strict=True))
        print(f"int8 sampling: {statistics.median(samples['patchgpt_int8']['sample']):.3f} rows/s, "
              f"{int8_ratio:.3f}x HF ImageGPT", flush=True)

    med = {n: {m: statistics.median(v) for m, v in s.items() if v} for n, s in samples.items()}
    ratio = {m: statistics.median(a / b for a, b in zip(samples["patchgpt"][m], samples["hf_imagegpt"][m],
                                                        strict=True)) for m in ("train", "sample")}
    tok_s = {n: med[n]["sample"] * steps for n in models}
    params = {n: sum(p.numel() for p in m.parameters()) for n, (m, _, _) in models.items()}
    res = {"device": args.device, "bf16_autocast": args.bf16, "threads": args.threads, "batch": B,
           "train_positions": T, "train_predictions": T - 1,
           "sample_steps": steps, "repeats": args.repeats, "sample_repeats": args.sample_repeats,
           "quick": args.quick, "torch": torch.__version__, "transformers": transformers.__version__,
           "machine": platform.machine(), "hf_attn_implementation": attn_impl,
           "hf_materialises_attention_matrix": materialised, "params": params,
           "median_train_images_per_s": {n: med[n]["train"] for n in models},
           "median_sample_rows_per_s": {n: med[n]["sample"] for n in models},
           "median_sample_tokens_per_s": tok_s, "ratio_patchgpt_over_hf": ratio, "samples": samples}

    what = "images/s" if steps == PIXELS else f"rows/s ({steps} tok)"
    precision = " (bf16 autocast)" if args.bf16 else ", fp32"
    print(f"\n{args.device}{precision}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads={args.threads}, batch={B}, train {T} positions / {T - 1} predictions x {args.repeats} repeats, "
          f"sample {steps} tokens x {args.sample_repeats} repeats")
    print(f"HF attention: {attn_impl}" + (" (ImageGPTAttention._attn materialises the (B, H, T, T) matrix: "
                                          "matmul + tril mask + softmax)" if materialised else ""))
    print(f"\n{'(medians)':24}{'patchgpt':>12}{'hf_imagegpt':>13}{'patchgpt/hf':>13}"
          "  (ratio: median of per-repeat ratios)")
    print(f"{'train images/s':24}{med['patchgpt']['train']:12.2f}{med['hf_imagegpt']['train']:13.2f}"
          f"{ratio['train']:13.3f}")
    print(f"{'sample ' + what:24}{med['patchgpt']['sample']:12.3f}{med['hf_imagegpt']['sample']:13.3f}"
          f"{ratio['sample']:13.3f}")
    print(f"{'sample tokens/s':24}{tok_s['patchgpt']:12.1f}{tok_s['hf_imagegpt']:13.1f}{ratio['sample']:13.3f}")
    print(f"{'parameters':24}{params['patchgpt']:12,}{params['hf_imagegpt']:13,}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
