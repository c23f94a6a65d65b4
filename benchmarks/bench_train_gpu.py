"""Training throughput and model-FLOPs utilisation of an S-size patchgpt model, against Hugging Face
`GPT2Model` fed `inputs_embeds`, in bf16 autocast on one GPU (or fp32 on CPU with ``--quick``).

Workload: AIM-style next-patch pretraining on 224x224 RGB images in 16x16 patches (196 tokens of 768 values),
the `small` size (12 layers, 6 heads, width 384, MLP 4x). patchgpt runs its real training path: the
`Pretrain` task (patch projection, backbone, MLP head, MSE loss), `make_optimizer` (AdamW, fused on CUDA),
``torch.autocast(bfloat16)``. The peer is the same shape in Hugging Face: ``nn.Linear(768, 384)`` in front of
`GPT2Model(inputs_embeds=...)` (SDPA attention), a ``Linear(384, 768)`` head and the same MSE to the next patch,
with the same optimizer and autocast. Both models also run under `torch.compile` (default mode).

Measured: images/s over ``--iters`` optimizer steps per repeat (CUDA synchronised), after warm-up (compile
included there), interleaving the variants across repeats; medians. MFU = images/s x model FLOPs per image /
peak, against H100/H200 dense bf16 peak (989 TFLOP/s) and against a measured 8192^3 bf16 matmul.
Model FLOPs per image (PaLM accounting, causal mask not discounted): 6 * N_mm * T + 12 * L * T^2 * C with
N_mm = 12 * L * C^2 + patch_dim * C (qkv, attention projection, MLP, patch projection; heads excluded).

Run: ``PYTHONPATH=. python benchmarks/bench_train_gpu.py [--batch 256 --iters 10 --repeats 3]``;
``--quick`` is a seconds-long CPU smoke test; ``--json out.json`` writes the results dict.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import write_json
from torch import Tensor, nn

from patchgpt.config import apply_size, default_config
from patchgpt.data.base import DataInfo
from patchgpt.tasks import Pretrain
from patchgpt.train import make_optimizer

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 tensor-core peak


class HFPatchGPT2(nn.Module):
    """Patch projection + `GPT2Model(inputs_embeds)` + linear head, next-patch MSE."""

    def __init__(self, L: int, H: int, C: int, T: int, D: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        kw = dict(n_embd=C, n_layer=L, n_head=H, n_positions=T, vocab_size=1, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        try:
            self.gpt2 = GPT2Model(GPT2Config(**kw, attn_implementation="sdpa"))
        except (ValueError, TypeError, ImportError):
            self.gpt2 = GPT2Model(GPT2Config(**kw))
        self.proj, self.head = nn.Linear(D, C), nn.Linear(C, D)

    def forward(self, patches: Tensor) -> Tensor:
        h = self.gpt2(inputs_embeds=self.proj(patches), use_cache=False).last_hidden_state   # (B, T, C)
        return F.mse_loss(self.head(h[:, :-1]).float(), patches[:, 1:].float())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="small")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: nano size, 32x32 images, batch 4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    image, patch = (224, 16) if not args.quick else (32, 8)
    if args.quick:
        args.size, args.batch, args.iters, args.repeats, args.no_compile = "nano", 4, 1, 1, True
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    cfg = default_config("pretrain")
    apply_size(cfg, args.size)
    cfg.tokenizer.patch_size, cfg.pretrain.prefix, cfg.pretrain.head_hidden = patch, False, 0
    task = Pretrain(cfg, DataInfo(channels=3, image_size=(image, image))).to(device)
    m = cfg.model
    L, H, C = m.n_layer, m.n_head, m.n_embd
    T, D = (image // patch) ** 2, patch * patch * 3
    n_mm = 12 * L * C * C + D * C
    flops = 6 * n_mm * T + 12 * L * T * T * C
    images = torch.rand(args.batch, 3, image, image, device=device) * 2 - 1
    patches = task.input.tok.patchify(images)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)

    variants: dict = {}

    def add(name: str, model: nn.Module, loss_fn) -> None:
        opt = make_optimizer(model, cfg, device) if isinstance(model, Pretrain) else \
            torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

        def step() -> None:
            with torch.autocast(**amp):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        variants[name] = step

    add("patchgpt", task, lambda: task({"image": images})[0])
    if not args.no_compile:
        compiled = torch.compile(task)
        add("patchgpt compiled", task, lambda: compiled({"image": images})[0])
    if not args.no_hf:
        hf = HFPatchGPT2(L, H, C, T, D).to(device)
        add("hf gpt2", hf, lambda: hf(patches))
        if not args.no_compile:
            hfc = torch.compile(hf)
            add("hf gpt2 compiled", hf, lambda: hfc(patches))

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, step in variants.items():
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        sync()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    peak_mm = None
    if cuda:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        sync()
        peak_mm = 10 * 2 * 8192**3 / (time.perf_counter() - t0)

    samples: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                variants[name]()
            sync()
            samples[name].append(args.iters * args.batch / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in samples.items()}
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "size": args.size, "layers": L, "heads": H, "width": C, "tokens": T, "patch_dim": D,
           "batch": args.batch, "params": task.num_params(), "flops_per_image": flops,
           "matmul_bf16_flops": peak_mm, "median_images_per_s": med, "samples": samples,
           "mfu_vs_989T": {n: v * flops / PEAK_BF16 for n, v in med.items()},
           "mfu_vs_matmul": {n: v * flops / peak_mm for n, v in med.items()} if peak_mm else None}
    print(f"\n{res['device']}, torch {torch.__version__}, {args.size} ({L} layers, width {C}, {H} heads, "
          f"{res['params'] / 1e6:.1f}M params), {T} tokens/image, batch {args.batch}, "
          f"{'bf16 autocast' if cuda else 'fp32'}")
    if peak_mm:
        print(f"8192^3 bf16 matmul: {peak_mm / 1e12:.0f} TFLOP/s")
    print(f"{'(medians)':22}{'images/s':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU/989T':>10}")
    for n, v in med.items():
        print(f"{n:22}{v:10.0f}{v * T:12.0f}{v * flops / 1e12:9.1f}{v * flops / PEAK_BF16:10.1%}")
    for base in ("hf gpt2", "hf gpt2 compiled"):
        if base in med:
            ours = "patchgpt compiled" if "compiled" in base else "patchgpt"
            print(f"{ours} / {base}: {med[ours] / med[base]:.2f}x")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
