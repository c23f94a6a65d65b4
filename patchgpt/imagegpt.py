"""OpenAI's ImageGPT in and out: a Hugging Face ``ImageGPTForCausalImageModeling`` (or
``ImageGPTForImageClassification``) directory <-> a patchgpt `generate` run over colour tokens.

The directory is read as files (``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` read with
``weights_only``, and the image processor's ``preprocessor_config.json`` with its colour clusters), so
importing needs neither `transformers` nor a network. Where ImageGPT's architecture differs from patchgpt's
defaults, the GPT has the option, set on import (`GPTConfig`): RMS-style layer norm without bias
(``norm=rms``), quick-GELU (``activation``), biases, 1-D learned positions only (``grid_pos=false``), an
untied head. ImageGPT's start-of-sequence token is patchgpt's ``bos`` (id 0, the colours follow), and its
Conv1D weights are transposed into linear layers. One more position row (zeros) lets patchgpt feed the last
pixel, whose output predicts nothing, so logits agree at every position ImageGPT has.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError, RunConfig
from .data.base import DataInfo
from .files import atomic_write_text
from .tasks import Task, default_config, load, task_class

PREFIX = "hf-imagegpt:"
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu": "gelu"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise CheckpointError(f"{path}: missing (an ImageGPT directory holds config.json, model.safetensors and "
                              "preprocessor_config.json, as save_pretrained writes them)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_weights(src: Path) -> dict[str, Tensor]:
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    if (src / "pytorch_model.bin").is_file():   # tensors only: weights_only refuses anything else in the pickle
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{src}: no model.safetensors or pytorch_model.bin")


def run_config(hf: dict, clusters: Tensor, size: int, out: str) -> RunConfig:
    """The patchgpt `generate` config that reproduces the ImageGPT config `hf`."""
    act = hf.get("activation_function", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"ImageGPT activation_function={act!r}: patchgpt has {', '.join(ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention") or \
            hf.get("scale_attn_weights", True) is not True:
        raise ConfigError("this ImageGPT uses attention options patchgpt does not have (scale_attn_by_inverse_"
                          "layer_idx, add_cross_attention or no scale_attn_weights)")
    K, C = int(hf["vocab_size"]) - 1, int(hf["n_embd"])
    if clusters.shape != (K, 3):
        raise ConfigError(f"preprocessor_config.json holds {tuple(clusters.shape)} clusters; the model has {K}")
    if size * size > int(hf["n_positions"]):
        raise ConfigError(f"{size}x{size} pixels do not fit the model's {hf['n_positions']} positions")
    cfg = default_config("generate")
    cfg.out, cfg.size = out, "imagegpt"
    cfg.generate.condition = "none"
    cfg.tokenizer.kind, cfg.tokenizer.n_colors = "colors", K
    cfg.data.image_size, cfg.data.channels = size, 3
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd = int(hf["n_layer"]), int(hf["n_head"]), C
    m.mlp_ratio = (hf.get("n_inner") or 4 * C) / C
    m.block_size = int(hf["n_positions"]) + 1
    m.bias, m.norm, m.norm_eps, m.activation, m.grid_pos = True, "rms", float(hf.get("layer_norm_epsilon", 1e-5)), \
        ACTIVATIONS[act], False
    m.dropout, m.drop_path = 0.0, 0.0
    return cfg


def _linear(w: Tensor) -> Tensor:
    """HF Conv1D weight (in, out) <-> nn.Linear weight (out, in)."""
    return w.t().contiguous()


def block_names(theirs: str, ours: str) -> list[tuple[str, str, bool]]:
    """One block's (ImageGPT name, patchgpt name, whether the weight is transposed), under the two prefixes."""
    out = [(theirs + n, ours + n, False) for n in ("ln_1.weight", "ln_2.weight")]
    for hf_name, own in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                         ("mlp.c_proj", "mlp.proj")):
        out += [(f"{theirs}{hf_name}.weight", f"{ours}{own}.weight", True),
                (f"{theirs}{hf_name}.bias", f"{ours}{own}.bias", False)]
    return out


def to_patchgpt(hf_weights: dict[str, Tensor], n_layer: int, K: int) -> dict[str, Tensor]:
    """ImageGPT state dict -> patchgpt backbone state dict (``backbone.`` names); ids: HF cluster c -> 1 + c,
    HF start-of-sequence K -> bos 0."""
    w = {k.removeprefix("transformer."): v for k, v in hf_weights.items()}
    wte = w["wte.weight"]                                                    # (K + 1, C)
    out = {"wte.weight": torch.cat([wte[K:K + 1], wte[:K]]),
           "wpe.weight": torch.cat([w["wpe.weight"], torch.zeros_like(w["wpe.weight"][:1])]),
           "ln_f.weight": w["ln_f.weight"]}
    if "lm_head.weight" in hf_weights:
        head = hf_weights["lm_head.weight"]                                  # (K, C)
        out["lm_head.weight"] = torch.cat([torch.zeros_like(head[:1]), head])
    for i in range(n_layer):
        for theirs, ours, transpose in block_names(f"h.{i}.", f"blocks.{i}."):
            out[ours] = _linear(w[theirs]) if transpose else w[theirs]
    return {f"backbone.{k}": v for k, v in out.items()}


def import_imagegpt(src: str | Path, out: str | Path) -> Path:
    """Convert the ImageGPT directory `src` into a patchgpt run in `out` (its checkpoint ``step_0000000``);
    returns `out`. An ``ImageGPTForImageClassification`` directory gives its backbone (no LM head: sample
    nothing from it, fine-tune or probe it with ``train classify --init``)."""
    src = Path(src).expanduser()
    hf = _read_json(src / "config.json")
    if hf.get("model_type") != "imagegpt":
        raise CheckpointError(f"{src}/config.json: model_type is {hf.get('model_type')!r}, not 'imagegpt'")
    pre = _read_json(src / "preprocessor_config.json")
    if "clusters" not in pre:
        raise CheckpointError(f"{src}/preprocessor_config.json: no colour clusters")
    clusters = torch.tensor(pre["clusters"], dtype=torch.float32)                # (K, 3) in [-1, 1]
    size = pre.get("size", 32)
    size = int(size.get("height", 32)) if isinstance(size, dict) else int(size)
    cfg = run_config(hf, clusters, size, str(out))
    task = task_class("generate")(cfg, DataInfo(channels=3, image_size=(size, size)))
    weights = to_patchgpt(_read_weights(src), cfg.model.n_layer, cfg.tokenizer.n_colors)
    own = task.state_dict()
    for name, v in weights.items():
        if own[name].shape != v.shape:
            raise CheckpointError(f"{src}: {name} is {tuple(v.shape)}, the converted model wants "
                                  f"{tuple(own[name].shape)}")
    weights["input.tok.palette"] = clusters
    missing = set(own) - set(weights)
    grid = {"backbone.frame_emb.weight", "backbone.row_emb.weight", "backbone.col_emb.weight"}
    with torch.no_grad():
        for name in grid:   # unused (grid_pos=false), kept at zero
            own[name].zero_()
    if missing - grid - {"backbone.lm_head.weight"}:
        raise CheckpointError(f"{src}: weights missing for {sorted(missing - grid)[:4]}")
    task.load_state_dict({**own, **weights})
    task.input.tok.fitted = True
    out = Path(out)
    checkpoint.save(out, task, cfg, 0)
    atomic_write_text(out / "config.json", cfg.dumps())
    return out


def export_imagegpt(ckpt: str | Path, out: str | Path) -> Path:
    """Write the patchgpt colour-token generator at `ckpt` as an ImageGPT directory `out` (config.json,
    model.safetensors, preprocessor_config.json) that ``ImageGPTForCausalImageModeling.from_pretrained``
    loads; a one-line error where the model's options are not ImageGPT's."""
    task: Task = load(ckpt)
    cfg, m = task.cfg, task.cfg.model
    need = {"a generate task": task.name == "generate", "tokenizer.kind=colors": cfg.tokenizer.kind == "colors",
            "generate.condition=none": getattr(task, "condition", "") == "none",
            "3 channels": task.info.channels == 3, "model.norm=rms": m.norm == "rms", "model.bias=true": m.bias,
            "model.grid_pos=false": not m.grid_pos, "square images": task.info.image_size[0] == task.info.image_size[1]}
    lacking = [k for k, ok in need.items() if not ok]
    if lacking:
        raise ConfigError(f"{ckpt}: ImageGPT's layout needs {', '.join(lacking)}")
    K, C, S = cfg.tokenizer.n_colors, m.n_embd, task.info.image_size[0]
    sd = {k.removeprefix("backbone."): v for k, v in task.state_dict().items() if k.startswith("backbone.")}
    hf = {"transformer.wte.weight": torch.cat([sd["wte.weight"][1:], sd["wte.weight"][:1]]),
          "transformer.wpe.weight": sd["wpe.weight"][:m.block_size - 1],
          "transformer.ln_f.weight": sd["ln_f.weight"], "lm_head.weight": sd["lm_head.weight"][1:]}
    for i in range(m.n_layer):
        for theirs, ours, transpose in block_names(f"transformer.h.{i}.", f"blocks.{i}."):
            hf[theirs] = _linear(sd[ours]) if transpose else sd[ours]
    act = {v: k for k, v in reversed(ACTIVATIONS.items())}[m.activation]
    config = {"architectures": ["ImageGPTForCausalImageModeling"], "model_type": "imagegpt", "vocab_size": K + 1,
              "n_positions": m.block_size - 1, "n_embd": C, "n_layer": m.n_layer, "n_head": m.n_head,
              "n_inner": int(m.mlp_ratio * C), "activation_function": act, "layer_norm_epsilon": m.norm_eps,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "tie_word_embeddings": False, "initializer_range": 0.02}
    processor = {"image_processor_type": "ImageGPTImageProcessor", "clusters": task.input.tok.palette.tolist(),
                 "do_resize": True, "size": {"height": S, "width": S}, "resample": 2, "do_normalize": True,
                 "do_color_quantize": True}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    atomic_write_text(out / "preprocessor_config.json", json.dumps(processor, indent=2))
    return out
