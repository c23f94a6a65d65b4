"""Training throughput and model-FLOPs utilisation of patchgpt models (S-size by default), against Hugging Face
`GPT2Model` fed `inputs_embeds`, in bf16 autocast on one GPU (or fp32 on CPU with ``--quick``).

Workload: AIM-style next-patch pretraining on 224x224 RGB images in 16x16 patches (196 tokens of 768 values),
at each size in ``--sizes`` (``small``: 12 layers, 6 heads, width 384; ``base``: 12 layers, 12 heads, width 768;
MLP 4x). patchgpt runs its real training path: the `Pretrain` task (patch projection, backbone, linear head,
MSE loss; no random prefix), `make_optimizer` (AdamW, fused on CUDA), ``torch.autocast(bfloat16)``. The peer is
the same shape in Hugging Face: ``nn.Linear(768, C)`` in front of `GPT2Model(inputs_embeds=...)` (SDPA
attention), a ``Linear(C, 768)`` head and the same MSE to the next patch, with the same optimizer and autocast.
Both models also run under `torch.compile` (the whole forward; backward through AOTAutograd; the optimizer step
eager), in each mode of ``--compile-mode`` (default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs;
a comma-separated list runs several): every mode is applied to both models, so each comparison is like for like.
The CUDA-graph modes (reduce-overhead, max-autotune) mark each step with ``cudagraph_mark_step_begin``; on the
CPU they are skipped with a note. A variant whose compilation fails is dropped with a note (and listed under
``failed`` in the JSON); the others still run. ``--time-limit S``: after S seconds no further compiled variant
is warmed up and no further size begun (they are listed under ``skipped``); what was warmed up is measured.

Measured: images/s over ``--iters`` optimizer steps per repeat (CUDA synchronised), after 3 warm-up steps
(compile and CUDA-graph recording included there), interleaving the variants across repeats; medians. MFU =
images/s x model FLOPs per image / peak, against H100/H200 dense bf16 peak (989 TFLOP/s) and against a measured
8192^3 bf16 matmul. Model FLOPs per image (PaLM accounting, causal mask not discounted): 6 * N_mm * T +
12 * L * T^2 * C with N_mm = 12 * L * C^2 + patch_dim * C (qkv, attention projection, MLP, patch projection;
heads excluded). Each row gives the ratio to the Hugging Face variant of the same mode (eager to eager,
compiled to compiled) and to the fastest compiled Hugging Face variant. The dynamo counters of each size (frames,
graphs, graph breaks) go to the JSON, to spot recompiles.

``--profile DIR``: after measuring, each compiled patchgpt variant (the eager one if none is compiled) runs
``--profile-steps`` steps under `torch.profiler` (CUDA and CPU activities; CPU only on the CPU), and
``DIR/<size>_<variant>.txt`` gets the step time, the summed kernel time per step, the top-25 kernels by self
CUDA time (self CPU time on the CPU) from ``key_averages().table`` and the top-15 host-side ops by self CPU time
(host syncs show up there as ``cudaStreamSynchronize``/``aten::item``).

Run: ``PYTHONPATH=. python benchmarks/bench_train_gpu.py [--sizes small,base --compile-mode default,reduce-overhead
--batch 256 --iters 10 --repeats 3 --profile prof/ --time-limit 300 --json out.json]``; ``--quick`` is a CPU smoke
test (nano size, 32x32 images, batch 4, one repeat of one step; no compile unless ``--compile-mode`` is given,
``--sizes`` honoured if given); ``--json out.json`` writes the results dict, each size's under ``sizes`` (rewritten
after each size is measured, so a run stopped later keeps the sizes already done).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import write_json
from torch import Tensor, nn

from patchgpt import default_config
from patchgpt.config import apply_size
from patchgpt.data.base import DataInfo
from patchgpt.tasks import Pretrain
from patchgpt.train import make_optimizer

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 tensor-core peak
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
WARMUP = 3


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


def suffix(mode: str) -> str:
    """The variant-name suffix of a compile mode: ``compiled`` for the default, ``compiled <mode>`` else."""
    return "compiled" if mode == "default" else f"compiled {mode}"


def peer_of(name: str) -> str:
    """The Hugging Face variant a patchgpt variant is compared with (same compile mode, or eager)."""
    return name.replace("patchgpt", "hf gpt2", 1)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"frames": dict(counters["frames"]), "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()), "graph_break_reasons":
            dict(list(counters["graph_break"].items())[:10]), "unimplemented": len(counters["unimplemented"])}


STARTED = time.perf_counter()


def out_of_time(args) -> bool:
    """Past ``--time-limit`` (seconds since this module's imports; 0: no limit): no further compile or size."""
    return bool(args.time_limit) and time.perf_counter() - STARTED > args.time_limit


def matmul_peak(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def profile(step, n: int, cuda: bool, path: Path, title: str, step_s: float | None) -> None:
    """Run `step` `n` times under `torch.profiler` and write the kernel and host-op tables to `path`."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    wall = (time.perf_counter() - t0) / n
    avg = prof.key_averages()
    lines = [title, f"profiled steps: {n}, {wall * 1e3:.2f} ms/step under the profiler"]
    if step_s:
        lines.append(f"measured step (benchmark median, no profiler): {step_s * 1e3:.2f} ms")
    if cuda:  # the device-side events (kernels, memcpy, memset) alone, as the table's own total counts them
        kernels = EventList([e for e in avg if e.device_type == DeviceType.CUDA
                             and not getattr(e, "is_user_annotation", False)], use_device="cuda")
        per_step = sum(e.self_cuda_time_total if getattr(e, "self_device_time_total", None) is None
                       else e.self_device_time_total for e in kernels) / n / 1e6  # us -> s
        lines.append(f"GPU kernel time: {per_step * 1e3:.2f} ms/step in {sum(e.count for e in kernels) / n:.0f} "
                     "kernels" + (f" = {per_step / step_s:.1%} of the measured step (the rest: launch gaps, host "
                                  "waits)" if step_s else ""))
        lines += ["", "Top 25 kernels by self CUDA time:",
                  kernels.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90)]
    else:
        lines += ["", "CPU run (no CUDA activity): top 25 ops by self CPU time:",
                  avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90)]
    if cuda:
        lines += ["", "Top 15 host-side ops by self CPU time (launch overhead, syncs):",
                  avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=90)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"profile: {path} ({wall * 1e3:.1f} ms/step under the profiler)", flush=True)


def run_size(size: str, args, device: torch.device, modes: list[str], peak_mm: float | None, save) -> None:
    """Build, warm up, measure every variant at one size and `save` the results, then profile if asked."""
    cuda = device.type == "cuda"
    image, patch = (224, 16) if not args.quick else (32, 8)
    torch.manual_seed(0)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()

    cfg = default_config("pretrain")
    apply_size(cfg, size)
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

    def add(name: str, model: nn.Module, loss_fn, graphs: bool = False) -> None:
        opt = make_optimizer(model, cfg, device) if isinstance(model, Pretrain) else \
            torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

        def step() -> None:
            if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(**amp):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        variants[name] = step

    def compiled_fn(model: nn.Module, mode: str):
        return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)

    hf = HFPatchGPT2(L, H, C, T, D).to(device) if not args.no_hf else None
    add("patchgpt", task, lambda: task({"image": images})[0])
    if hf is not None:
        add("hf gpt2", hf, lambda: hf(patches))
    for mode in modes:
        graphs = cuda and mode in CUDA_GRAPH_MODES
        pc = compiled_fn(task, mode)
        add(f"patchgpt {suffix(mode)}", task, lambda pc=pc: pc({"image": images})[0], graphs)
        if hf is not None:
            hc = compiled_fn(hf, mode)
            add(f"hf gpt2 {suffix(mode)}", hf, lambda hc=hc: hc(patches), graphs)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    failed: dict[str, str] = {}
    skipped: list[str] = []
    for name in list(variants):
        if "compiled" in name and out_of_time(args):
            skipped.append(name)
            del variants[name]
            print(f"warm-up {size} {name}: skipped, past --time-limit {args.time_limit:.0f} s", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            for _ in range(WARMUP):
                variants[name]()
            sync()
        except Exception as e:  # noqa: BLE001 - a failing compile mode must not cost the other variants
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            failed[name] = f"{type(e).__name__}: {first}"
            del variants[name]
            print(f"warm-up {size} {name}: FAILED ({failed[name]}); dropped", flush=True)
            continue
        print(f"warm-up {size} {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    samples: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.repeats if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                variants[name]()
            sync()
            samples[name].append(args.iters * args.batch / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in samples.items()}
    best_hf = max((v for n, v in med.items() if n.startswith("hf gpt2 compiled")), default=None)
    ratios = {n: {"vs_same_mode_hf": med[n] / med[peer_of(n)] if peer_of(n) in med else None,
                  "vs_best_hf_compiled": med[n] / best_hf if best_hf else None}
              for n in med if n.startswith("patchgpt")}

    res = {"size": size, "layers": L, "heads": H, "width": C, "tokens": T, "patch_dim": D, "image": image,
           "batch": args.batch, "params": task.num_params(), "flops_per_image": flops,
           "median_images_per_s": med, "samples": samples,
           "mfu_vs_989T": {n: v * flops / PEAK_BF16 for n, v in med.items()},
           "mfu_vs_matmul": {n: v * flops / peak_mm for n, v in med.items()} if peak_mm else None,
           "ratios": ratios, "failed": failed, "skipped": skipped, "dynamo": dynamo_counters()}
    save(res)  # before profiling: a profiler failure loses no measurement

    if args.profile:
        targets = [n for n in variants if n.startswith("patchgpt compiled")] or \
            (["patchgpt"] if "patchgpt" in variants else [])
        for name in targets:
            note = " (eager: no compiled variant ran)" if name == "patchgpt" else ""
            title = (f"{size}: {name}{note}, {L} layers, width {C}, {H} heads, {T} tokens/image, batch {args.batch}, "
                     f"{'bf16 autocast' if cuda else 'fp32'}, torch {torch.__version__}")
            path = Path(args.profile) / f"{size}_{slug(name)}.txt"
            try:
                profile(variants[name], args.profile_steps, cuda, path, title, args.batch / med[name])
            except Exception as e:  # noqa: BLE001 - the measurements are saved; say why there is no table
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{title}\nprofiling failed: {type(e).__name__}: {e}\n")
                print(f"profile {size} {name}: FAILED ({type(e).__name__}: {str(e)[:200]})", flush=True)


def print_rows(res: dict, header: bool) -> None:
    if header:
        print(f"{'size':7}{'(medians)':46}{'images/s':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU/989T':>10}"
              f"{'MFU/mm':>8}{'x HF same':>11}{'x HF comp':>11}")
    mm = res["mfu_vs_matmul"] or {}
    for n, v in res["median_images_per_s"].items():
        r = res["ratios"].get(n, {})
        same, comp = r.get("vs_same_mode_hf"), r.get("vs_best_hf_compiled")
        mfu_mm = f"{mm[n]:8.1%}" if n in mm else f"{'-':>8}"
        print(f"{res['size']:7}{n:46}{v:10.0f}{v * res['tokens']:12.0f}{v * res['flops_per_image'] / 1e12:9.1f}"
              f"{v * res['flops_per_image'] / PEAK_BF16:10.1%}{mfu_mm}"
              f"{(f'{same:.2f}x' if same else '-'):>11}{(f'{comp:.2f}x' if comp else '-'):>11}")
    for n, why in res["failed"].items():
        print(f"{res['size']:7}{n:46}  FAILED: {why}")
    for n in res.get("skipped", []):
        print(f"{res['size']:7}{n:46}  skipped (--time-limit)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default=None, help="comma-separated model sizes (default: small; nano with --quick)")
    ap.add_argument("--size", default=None, help="one model size (the same as --sizes with one name)")
    ap.add_argument("--compile-mode", default=None,
                    help=f"comma-separated torch.compile modes for both models, of {', '.join(MODES)} "
                         "(default: default; none with --quick)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", default=None, metavar="DIR", help="write torch.profiler tables here")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=0.0, metavar="S",
                    help="after S seconds start no further compiled variant or size (skipped, and listed so); "
                         "what was warmed up is still measured (0: no limit)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: nano size, 32x32 images, batch 4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    sizes = [s for s in (args.sizes or args.size or ("nano" if args.quick else "small")).split(",") if s]
    modes = [s.strip() for s in (args.compile_mode or "default").split(",") if s.strip()]
    bad = [s for s in modes if s not in MODES]
    if bad:
        ap.error(f"--compile-mode {','.join(bad)}: choose from {', '.join(MODES)}")
    if args.quick:
        args.batch, args.iters, args.repeats = 4, 1, 1
        args.profile_steps = min(args.profile_steps, 2)
        if args.compile_mode is None:
            args.no_compile = True
    if args.no_compile:
        modes = []
    if not cuda:
        for s in [s for s in modes if s in CUDA_GRAPH_MODES]:
            print(f"note: --compile-mode {s} uses CUDA graphs: skipped on the CPU", flush=True)
        modes = [s for s in modes if s not in CUDA_GRAPH_MODES]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None

    peak_mm = matmul_peak(device) if cuda else None
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "transformers": hf_version, "precision": "bf16 autocast" if cuda else "fp32",
           "compile_modes": modes, "batch": args.batch, "iters": args.iters, "repeats": args.repeats,
           "matmul_bf16_flops": peak_mm, "sizes": {}}
    def save(r: dict) -> None:
        res["sizes"][r["size"]] = r
        write_json(args.json, res)  # after each size: a later size that runs out of time loses nothing
        print()
        print_rows(r, header=True)
        print(flush=True)

    for size in sizes:
        if out_of_time(args):
            res.setdefault("skipped_sizes", []).append(size)
            print(f"{size}: skipped, past --time-limit {args.time_limit:.0f} s", flush=True)
            continue
        run_size(size, args, device, modes, peak_mm, save)
        torch._dynamo.reset()  # the size's compiled graphs and CUDA-graph pools go
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    write_json(args.json, res)
    print(f"\n{res['device']}, torch {torch.__version__}, transformers {hf_version}, batch {args.batch}, "
          f"{res['precision']}, compile modes: {', '.join(modes) or 'none'}")
    if peak_mm:
        print(f"8192^3 bf16 matmul: {peak_mm / 1e12:.0f} TFLOP/s")
    for size, r in res["sizes"].items():
        print(f"{size}: {r['layers']} layers, width {r['width']}, {r['heads']} heads, {r['params'] / 1e6:.1f}M params, "
              f"{r['tokens']} tokens/image, {r['flops_per_image'] / 1e9:.1f} GFLOP/image (train)")
    for i, r in enumerate(res["sizes"].values()):
        print_rows(r, header=i == 0)


if __name__ == "__main__":
    main()
