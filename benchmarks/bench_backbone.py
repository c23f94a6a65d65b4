"""Backbone throughput: patchgpt's `GPT` against Hugging Face `GPT2Model` fed `inputs_embeds`, on CPU.

Both models see the same batch of random 3x32x32 images in [-1, 1] cut into 4x4 patches (64 tokens of 48
values), width 256, 6 layers, 8 heads, MLP 4x, fp32, causal attention. Each model owns one
``nn.Linear(48, 256)`` patch projection (patchgpt's `patch_proj`; a `Linear` in front of GPT-2). Measured:
training images/s (forward + mean-square loss on the final hidden states + backward + AdamW step +
zero_grad) and inference images/s (forward under `torch.inference_mode()`), after 3 warm-up iterations,
interleaving the two models across repeats (alternating which goes first) and reporting medians, since
machine speed drifts. MFU divides model FLOPs by a large fp32 `torch.mm` ceiling measured in each repeat.
Patchifying is done once, outside the timed region, for both models.

Run: ``PYTHONPATH=. python benchmarks/bench_backbone.py [--threads 2 --repeats 7 --iters 3 --batch 64]``;
``--quick`` is a seconds-long smoke test; ``--json out.json`` writes the results dict.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers
from common import write_json
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model

from patchgpt.model import GPT, GPTConfig
from patchgpt.tokenizers.patches import Patches

LAYERS, HEADS, WIDTH, PATCH, IMAGE, CHANNELS = 6, 8, 256, 4, 32, 3
TOKENS = (IMAGE // PATCH) ** 2                       # 64
PATCH_DIM = PATCH * PATCH * CHANNELS                 # 48
# Model FLOPs (PaLM-style MFU accounting; causal masking is NOT discounted, both models are causal):
#   N_mm = 12 * n_layer * C^2 + patch_dim * C  (weights of every matmul on the token path: qkv, attn proj,
#          mlp fc, mlp proj, patch projection; biases, embeddings and LayerNorms excluded; no head is applied)
#   train FLOPs/image = 6 * N_mm * T + 12 * n_layer * T^2 * C   (fwd + bwd)
#   infer FLOPs/image = 2 * N_mm * T +  4 * n_layer * T^2 * C   (fwd only)
N_MM = 12 * LAYERS * WIDTH**2 + PATCH_DIM * WIDTH
TRAIN_FLOPS = 6 * N_MM * TOKENS + 12 * LAYERS * TOKENS**2 * WIDTH
INFER_FLOPS = 2 * N_MM * TOKENS + 4 * LAYERS * TOKENS**2 * WIDTH
FORMULA = ("train = 6*N_mm*T + 12*L*T^2*C, infer = 2*N_mm*T + 4*L*T^2*C per image; "
           "N_mm = 12*L*C^2 + patch_dim*C (causal mask not discounted)")


class HFPatchGPT2(nn.Module):
    """`nn.Linear(48, 256)` patch embedding in front of `GPT2Model(inputs_embeds=...)`."""

    def __init__(self) -> None:
        super().__init__()
        kw = {"n_embd": WIDTH, "n_layer": LAYERS, "n_head": HEADS, "n_positions": TOKENS, "vocab_size": 1,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "use_cache": False,
              "bos_token_id": 0, "eos_token_id": 0}  # the token ids only silence a vocab_size=1 warning
        try:
            self.gpt2 = GPT2Model(GPT2Config(**kw, attn_implementation="sdpa"))
        except (ValueError, TypeError, ImportError):
            self.gpt2 = GPT2Model(GPT2Config(**kw))
        self.attn_impl = self.gpt2.config._attn_implementation
        self.proj = nn.Linear(PATCH_DIM, WIDTH)

    def forward(self, patches: Tensor) -> Tensor:
        return self.gpt2(inputs_embeds=self.proj(patches), use_cache=False).last_hidden_state


def train_step(run, opt: torch.optim.Optimizer) -> None:
    loss = run().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def infer_step(run) -> None:
    with torch.inference_mode():
        run()


def images_per_s(step, iters: int, batch: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * batch / (time.perf_counter() - t0)


def mm_flops(a: Tensor, b: Tensor, reps: int = 3) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return reps * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="iterations per timed repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 repeats of 1 iteration, batch 8")
    ap.add_argument("--json", type=str, default=None, help="write the results dict here")
    args = ap.parse_args()
    warmup, mm_n = 3, 2048
    if args.quick:
        args.repeats, args.iters, args.batch, warmup, mm_n = 2, 1, 8, 1, 512
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images = torch.rand(args.batch, CHANNELS, IMAGE, IMAGE) * 2 - 1
    seq = Patches(PATCH, CHANNELS, (IMAGE, IMAGE)).encode(images)
    ours = GPT(GPTConfig(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, block_size=TOKENS, patch_dim=PATCH_DIM,
                         vocab_size=1, max_rows=IMAGE // PATCH, max_cols=IMAGE // PATCH))
    hf = HFPatchGPT2()
    models = {"patchgpt": (ours, lambda: ours(seq)), "hf_gpt2": (hf, lambda: hf(seq.patches))}
    assert ours(seq).shape == hf(seq.patches).shape == (args.batch, TOKENS, WIDTH)
    steps = {}
    for name, (model, run) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = {"train": lambda r=run, o=opt: train_step(r, o),
                       "infer": lambda r=run: infer_step(r)}
        for _ in range(warmup):
            steps[name]["train"]()
            steps[name]["infer"]()
    a, b = torch.randn(mm_n, mm_n), torch.randn(mm_n, mm_n)
    mm_flops(a, b)

    samples = {n: {"train": [], "infer": []} for n in models}
    peak = []
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for mode in ("train", "infer"):
            for name in order:
                samples[name][mode].append(images_per_s(steps[name][mode], args.iters, args.batch))
        peak.append(mm_flops(a, b))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    peak_flops = statistics.median(peak)
    med = {n: {m: statistics.median(v) for m, v in s.items()} for n, s in samples.items()}
    mfu = {n: {"train": med[n]["train"] * TRAIN_FLOPS / peak_flops,
               "infer": med[n]["infer"] * INFER_FLOPS / peak_flops} for n in models}
    params = {n: sum(p.numel() for p in m.parameters()) for n, (m, _) in models.items()}
    # Median of the per-repeat ratios: each repeat times both models back to back, so drift mostly cancels.
    ratio = {m: statistics.median(a / b for a, b in zip(samples["patchgpt"][m], samples["hf_gpt2"][m],
                                                        strict=True)) for m in ("train", "infer")}
    res = {"threads": args.threads, "batch": args.batch, "repeats": args.repeats, "iters": args.iters,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "machine": platform.machine(), "hf_attn_implementation": hf.attn_impl, "matmul_n": mm_n,
           "matmul_peak_flops": peak_flops,
           "n_mm": N_MM, "train_flops_per_image": TRAIN_FLOPS, "infer_flops_per_image": INFER_FLOPS,
           "flops_formula": FORMULA, "params": params, "median_images_per_s": med,
           "ratio_patchgpt_over_hf": ratio, "mfu": mfu, "samples": samples, "matmul_samples": peak}

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, threads={args.threads}, "
          f"batch={args.batch}, {args.repeats} repeats x {args.iters} iters, HF attention: {hf.attn_impl}")
    print(f"matmul ceiling ({mm_n}x{mm_n} fp32 torch.mm, median): {peak_flops / 1e9:.1f} GFLOP/s")
    print(f"FLOPs: {FORMULA}\n  N_mm={N_MM:,}  train={TRAIN_FLOPS / 1e9:.3f} GFLOP/img  "
          f"infer={INFER_FLOPS / 1e9:.3f} GFLOP/img")
    print(f"\n{'(medians)':22}{'patchgpt':>12}{'hf_gpt2':>12}{'patchgpt/hf':>13}"
          "  (ratio: median of per-repeat ratios)")
    for mode in ("train", "infer"):
        print(f"{mode + ' images/s':22}{med['patchgpt'][mode]:12.1f}{med['hf_gpt2'][mode]:12.1f}"
              f"{ratio[mode]:13.3f}")
    for mode in ("train", "infer"):
        print(f"{mode + ' MFU':22}{mfu['patchgpt'][mode]:12.1%}{mfu['hf_gpt2'][mode]:12.1%}")
    print(f"{'parameters':22}{params['patchgpt']:12,}{params['hf_gpt2']:12,}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
