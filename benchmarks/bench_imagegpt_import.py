"""Imported ImageGPT: sampling speed of the same weights in patchgpt (after ``patchgpt import-hf``) and in
Hugging Face ``ImageGPTForCausalImageModeling.generate``.

The model has ``openai/imagegpt-small``'s shape (24 layers, 512 wide, 8 heads, 512 colours, 32x32 pixels;
random weights: the speed does not depend on their values, and nothing is downloaded). It is saved with
``save_pretrained``, imported with `patchgpt.imagegpt.import_imagegpt`, and both sample the first ``--tokens``
pixels of ``--batch`` images from the start-of-sequence token with plain sampling (temperature 1, no top-k),
interleaved, after a warm-up; medians of tokens per second and of the per-repeat ratio.

Run: ``PYTHONPATH=. python benchmarks/bench_imagegpt_import.py [--tokens 128 --batch 4 --repeats 3]``
(``--quick``: a 2-layer model, 32 tokens, for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import numpy as np
import torch
from common import timed, write_json
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from patchgpt import load
from patchgpt.imagegpt import import_imagegpt
from patchgpt.sampling import SamplingParams, sample
from patchgpt.sequence import tokens

K, SIDE = 512, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="pixels sampled per image")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    layers, steps = (2, 32) if a.quick else (24, a.tokens)
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=K + 1, n_positions=SIDE * SIDE, n_embd=512,
                                                       n_layer=layers, n_head=8, resid_pdrop=0.0, embd_pdrop=0.0,
                                                       attn_pdrop=0.0)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        clusters = np.random.default_rng(0).uniform(-1, 1, (K, 3)).tolist()
        with open(f"{d}/preprocessor_config.json", "w") as f:
            json.dump({"clusters": clusters, "size": {"height": SIDE, "width": SIDE}}, f)
        import_imagegpt(d, f"{d}/run")
        ours = load(f"{d}/run")
    B = a.batch
    sos_hf = torch.full((B, 1), K)
    prompt = tokens(torch.zeros(B, 1, dtype=torch.long))                   # patchgpt's bos is id 0
    grid = ours.input.encode(torch.zeros(1, 3, SIDE, SIDE)).pos[0, 1:]    # the pixels' positions
    gen = torch.Generator().manual_seed(0)

    def run_ours() -> None:
        with torch.no_grad():
            sample(ours.backbone, prompt, steps, SamplingParams(temperature=1.0, top_k=0), positions=grid[:steps],
                   generator=gen, allowed=[ours.input.tok.ids])

    def run_hf() -> None:
        with torch.no_grad():
            hf.generate(input_ids=sos_hf, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                        max_length=1 + steps, min_length=1 + steps, eos_token_id=None, pad_token_id=0)

    runs = {"patchgpt": run_ours, "hf_imagegpt": run_hf}
    for f in runs.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(a.repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[name].append(timed(runs[name]))
    tok_s = {n: statistics.median(B * steps / t for t in ts) for n, ts in times.items()}
    ratio = statistics.median(h / o for o, h in zip(times["patchgpt"], times["hf_imagegpt"], strict=True))
    res = {"layers": layers, "tokens": steps, "batch": B, "threads": a.threads, "tokens_per_s": tok_s,
           "ratio": ratio}
    print(f"imported imagegpt-small shape ({layers} layers), {steps} tokens x batch {B}: patchgpt "
          f"{tok_s['patchgpt']:.1f} tokens/s, HF generate {tok_s['hf_imagegpt']:.1f} tokens/s -> {ratio:.2f}x")
    write_json(a.json, res)


if __name__ == "__main__":
    main()
