"""Find a model, read its config and tokenizer, build it on the device and fill its weights.

``model`` may be: a local HF checkpoint directory; the embedded default ``fairswitch-tiny`` (a
checkpoint directory inside the package); a shipped config name (``llama-3-8b`` ...) for dummy
weights, with the cl100k_base tokenizer (model/cl100k.py); or a Hugging Face Hub repository
(``owner/name``, hub.py), fetched into the Hub's cache.
Weights come from ``*.safetensors`` (single file or sharded with an index; FP8 checkpoints'
dequantized with their scales, model/fp8_checkpoint.py), or are random (``load_format="dummy"``)
with realistic scales, for benchmarks at real model shapes.

Under tensor parallelism a rank reads only its slice of each checkpoint tensor (lazily, through
``get_slice``), and its dummy weights are its slice of the TP=1 dummy weights: every parameter is
drawn whole, with the TP=1 generator sequence, then cut (``Shard``, distributed/shard_plan.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fairswitch.distributed.parallel_state import SINGLE, TPGroup
from fairswitch.distributed.shard_plan import Shard
from fairswitch.model import fp8_checkpoint, hub
from fairswitch.model.checkpoint_config import CheckpointConfig, read_json
from fairswitch.model.fp8_checkpoint import Fp8Checkpoint
from fairswitch.model.llama import LlamaForCausalLM
from fairswitch.model.moe import SparseMoE, expert_shard
from fairswitch.model.tokenizer import load_tokenizer  # noqa: F401  (the loader's API)

CONFIG_DIR = Path(__file__).parent / "configs"
# Checkpoint tensors that are no weights: RoPE tables some Llama checkpoints carry.
_IGNORED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_LFS_POINTER = b"version https://git-lfs"


@dataclass
class ModelSource:
    name: str
    checkpoint_dir: Path | None  # None: a shipped config without weights
    config_path: Path


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None,
                  weights: bool = True) -> ModelSource:
    """Where ``model`` is: the default model, a checkpoint directory, a shipped config, or a
    Hugging Face Hub repository (hub.py: ``revision``, ``download_dir``; its weights are
    fetched only where ``weights``)."""
    from fairswitch.model.default_model import default_model_dir, is_default_model_name

    if is_default_model_name(model):
        path = default_model_dir()
        return ModelSource(model, path, path / "config.json")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return ModelSource(model, path, path / "config.json")
    if (CONFIG_DIR / f"{model}.json").is_file():
        return ModelSource(model, None, CONFIG_DIR / f"{model}.json")
    if hub.looks_like_repo_id(model):
        path = hub.snapshot(model, revision, download_dir, weights)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the Hugging Face Hub repository {model!r} has no "
                                    "config.json: it holds no model fairswitch can load")
        return ModelSource(model, path, path / "config.json")
    raise FileNotFoundError(
        f"model {model!r} is neither an existing directory nor a known name "
        f"(known: {', '.join(shipped_config_names())})"
    )


def load_checkpoint_config(source: ModelSource) -> CheckpointConfig:
    return CheckpointConfig.from_file(source.config_path)


def build_model(config: CheckpointConfig, backend: Any, max_positions: int, dtype: torch.dtype,
                device: torch.device, tp: TPGroup = SINGLE) -> LlamaForCausalLM:
    """Build on ``device`` in ``dtype`` (no copy, no cast), running ``backend``'s kernels;
    with ``tp`` of several ranks, this rank's shard of the model."""
    with torch.device(device):
        model = LlamaForCausalLM(config, backend, max_positions, backend.ops, dtype, tp)
    return model.eval()


@dataclass(frozen=True)
class _Target:
    """Where a checkpoint tensor goes: ``param`` (this rank's), ``shard`` (its slice of the TP=1
    parameter; None: whole), ``part``: the (start, length) rows of the TP=1 fused parameter
    (q|k|v, gate|up) the tensor is; None: all of it. ``owner``: for one expert's tensor, the
    stacked parameter (``param`` is the expert's slice of it), which is filled when every
    expert's parts are."""
    param: torch.Tensor
    shard: Shard | None
    part: tuple[int, int] | None
    owner: torch.Tensor | None = None  # the stacked experts' parameter ``param`` is a slice of


def _shard_of(model: LlamaForCausalLM, name: str) -> Shard | None:
    """Our parameter ``name``'s slice of the TP=1 parameter (None: whole on every rank)."""
    if name in ("embed_tokens", "lm_head.weight"):
        return model.vocab_shard
    owner, _, kind = name.rpartition(".")
    module = model.get_submodule(owner)
    shard = getattr(module, "shard", None) or getattr(module, f"{kind}_shard", None)  # (experts)
    # A bias follows the output rows; a row-parallel layer's bias is whole (added once).
    return None if shard is None or (kind == "bias" and shard.dim != 0) else shard


# HF parameter name (suffix) -> our parameter, its shard, and its part of a fused projection
def _target(name: str, model: LlamaForCausalLM) -> _Target | None:
    if name == "model.embed_tokens.weight":
        return _Target(model.embed_tokens, model.vocab_shard, None)
    if name == "model.norm.weight":
        return _Target(model.norm.weight, None, None)
    if name == "lm_head.weight":
        return (_Target(model.lm_head.weight, model.vocab_shard, None)
                if model.lm_head is not None else None)
    if not name.startswith("model.layers."):
        return None
    parts = name.split(".")
    if len(parts) < 5 or not parts[2].isdigit() or int(parts[2]) >= len(model.layers):
        return None  # (a layer config.json does not have)
    layer_idx = int(parts[2])
    sub, kind = ".".join(parts[3:-1]), parts[-1]
    if sub.startswith(("mlp.experts", "block_sparse_moe.")) or sub == "mlp.gate":
        return _expert_target(model.layers[layer_idx].mlp, sub, kind)
    cfg = model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    inter = cfg.intermediate_size
    fused = {  # our fused module, the part's (start, length) rows in the TP=1 parameter
        "self_attn.q_proj": ("self_attn.qkv_proj", (0, q)),
        "self_attn.k_proj": ("self_attn.qkv_proj", (q, kv)),
        "self_attn.v_proj": ("self_attn.qkv_proj", (q + kv, kv)),
        "mlp.gate_proj": ("mlp.gate_up_proj", (0, inter)),
        "mlp.up_proj": ("mlp.gate_up_proj", (inter, inter)),
    }
    plain = ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
             "self_attn.q_norm", "self_attn.k_norm",
             "self_attn.qkv_proj", "mlp.gate_up_proj")  # (Phi-3 stores these two fused)
    if sub in fused:
        ours, part = fused[sub]
    elif sub in plain:
        ours, part = sub, None
    else:
        return None
    try:
        module = model.layers[layer_idx].get_submodule(ours)
    except AttributeError:  # (q_norm of a model without: as a parameter it does not have)
        module = None
    param = getattr(module, kind, None)
    if param is None:  # e.g. a bias config.json does not declare: refused, not dropped
        raise ValueError(f"the checkpoint has {name}, for which the model that config.json "
                         f"describes has no parameter")
    return _Target(param, _shard_of(model, f"layers.{layer_idx}.{ours}.{kind}"), part)


# One expert's tensors (Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj) -> the stacked
# parameter, and the part of w13 (gate | up) it is
_EXPERT_PARTS = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1),
                 "up_proj": ("w13", 1), "w2": ("w2", None), "down_proj": ("w2", None)}


def _expert_target(mlp: Any, sub: str, kind: str) -> _Target | None:
    """A sparse block's tensor: the router (``mlp.gate.weight``), one expert's projection
    (``mlp.experts.<e>.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.<e>.w1.weight``)
    or all experts' stacked (transformers 5's ``mlp.experts.gate_up_proj`` / ``down_proj``);
    None where the model has no parameter for it (a dense layer, an expert past the last)."""
    if not isinstance(mlp, SparseMoE):  # (a dense layer: no parameter for it)
        return None
    path = sub.replace("block_sparse_moe", "mlp", 1).split(".")
    if path == ["mlp", "gate"] and kind == "weight":
        return _Target(mlp.gate, None, None)
    if path == ["mlp", "experts"] and kind in ("gate_up_proj", "down_proj"):
        stacked = kind == "gate_up_proj"
        return _Target(mlp.w13 if stacked else mlp.w2,
                       mlp.w13_shard if stacked else mlp.w2_shard, None)
    if (len(path) == 4 and path[:2] == ["mlp", "experts"] and path[2].isdigit()
            and path[3] in _EXPERT_PARTS and kind == "weight"
            and int(path[2]) < mlp.w13.shape[0]):
        stacked, part = _EXPERT_PARTS[path[3]]
        owner = getattr(mlp, stacked)
        inter = mlp.w13_shard.full_size // 2
        return _Target(owner[int(path[2])], expert_shard(getattr(mlp, f"{stacked}_shard")),
                       None if part is None else (part * inter, inter), owner)
    return None  # (an expert past num_experts, or no expert tensor at all)


def _parts_needed(model: LlamaForCausalLM) -> dict[int, int]:
    """How many checkpoint tensors fill each parameter that several do: q|k|v (weight and
    bias), gate|up, and the stacked experts (gate and up of each expert, down of each)."""
    needed = {}
    for layer in model.layers:
        needed.update((id(p), 3) for p in layer.self_attn.qkv_proj.parameters())
        if isinstance(layer.mlp, SparseMoE):
            needed[id(layer.mlp.w13)] = 2 * layer.mlp.w13.shape[0]
            needed[id(layer.mlp.w2)] = layer.mlp.w2.shape[0]
        else:
            needed[id(layer.mlp.gate_up_proj.weight)] = 2
    return needed


def _checkpoint_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{ckpt}: shards listed in the index are missing: {missing}")
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    # Mistral's repositories carry the weights in Mistral's own format too (other tensor names).
    files = [f for f in files if not f.name.startswith("consolidated")] or files
    if not files:
        other = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise FileNotFoundError(
            f"no *.safetensors weights in {ckpt}"
            + (f": only safetensors are read, not {', '.join(other[:3])}" if other else "")
            + " (use load_format='dummy' for random weights)")
    return files


def _open(file: Path) -> Any:
    """``safe_open`` of ``file``; ValueError naming it if its header is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        with open(file, "rb") as f:
            pointer = f.read(len(_LFS_POINTER)) == _LFS_POINTER
        hint = " (a Git LFS pointer, not the weights: run `git lfs pull`)" if pointer else ""
        raise ValueError(f"{file} is not a readable safetensors file{hint}: {e}") from None


def check_weight_files(ckpt: Path) -> None:
    """Every weight file of ``ckpt`` is there and has a safetensors header (reads headers only):
    a bad checkpoint fails before tensor-parallel workers start, naming the file."""
    for file in _checkpoint_files(ckpt):
        with _open(file):
            pass


def _copy_shard(param: torch.Tensor, shard: Shard, span: tuple[int, int],
                read: Callable[[int, int], torch.Tensor]) -> None:
    """Fill ``param`` with its pieces that fall in ``span`` (start, length) of the TP=1 dim;
    ``read(offset, n)``: the span's ``[offset, offset + n)`` along that dim. Pads with zeros."""
    for local, offset, n in shard.overlaps(*span):
        param.narrow(shard.dim, local, n).copy_(read(offset, n))
    pad_at, pad = shard.padding
    if pad:
        param.narrow(shard.dim, pad_at, pad).zero_()


def _read_into(target: _Target, tensor: Any, name: str, file: Path) -> None:
    """Copy this rank's rows/columns of the checkpoint ``tensor`` (a lazy safetensors slice)
    into ``target.param``, reading only those bytes."""
    param = target.param
    shard = target.shard or Shard.whole(param.shape[0])
    expected = list(shard.full_shape(tuple(param.shape)))
    if target.part is not None:  # q, k, v, gate or up: rows of a fused TP=1 parameter
        expected[0] = target.part[1]
    if list(tensor.get_shape()) != expected:
        raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.get_shape())}, "
                         f"the model expects {tuple(expected)}")
    # Fused parameters shard by rows, so a part's rows on this rank are the shard's overlaps.
    span = target.part or (0, shard.full_size)
    lead = (slice(None),) * shard.dim
    _copy_shard(param, shard, span, lambda offset, n: tensor[lead + (slice(offset, offset + n),)])


class _InMemory:
    """A tensor already read (a dequantized fp8 one) in the lazy slice's interface."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.tensor[index]


def _weight_scales(files: list[Path]) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint's weight scales by the name of the weight they scale (scales are
    small: one a tensor, a row or a 128 x 128 block)."""
    scales = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                owner, _, suffix = name.rpartition(".")
                if suffix in fp8_checkpoint.WEIGHT_SCALES:
                    if f"{owner}.weight" in scales:
                        raise ValueError(f"{file.name}: {owner}.weight has two scales")
                    scales[f"{owner}.weight"] = f.get_tensor(name)
    return scales


def _checkpoint_tensor(f: Any, name: str, file: Path, fmt: Fp8Checkpoint | None,
                       scales: dict[str, torch.Tensor]) -> Any:
    """The tensor ``name`` of the open file ``f``: a lazy slice, or an fp8 one dequantized with
    its scale (float32). ValueError for fp8 where config.json declares no fp8 quantization, or
    without its scale."""
    tensor = f.get_slice(name)
    dtype = tensor.get_dtype()
    if not dtype.startswith("F8"):
        return tensor
    if fmt is None or dtype != "F8_E4M3":
        why = ("config.json declares no quantization_config" if fmt is None
               else "only float8_e4m3fn weights are supported")
        raise ValueError(f"{file.name}: {name} is {dtype}, but {why}")
    if name not in scales:
        raise ValueError(f"{file.name}: {name} is fp8 but the checkpoint has no "
                         f"{name}_scale (or _scale_inv) for it")
    return _InMemory(fp8_checkpoint.dequantize(f.get_tensor(name), scales[name], fmt, name))


def load_weights(model: LlamaForCausalLM, ckpt: Path) -> set[int]:
    """Fill ``model`` from the checkpoint; ValueError for a tensor it lacks, one it has no
    parameter for (dropping it would serve a different model), or one found twice. An FP8
    checkpoint's weights are dequantized with their scales (model/fp8_checkpoint.py); its
    activation and KV-cache scales are not used. Returns the ids of the parameters an FP8
    checkpoint keeps unquantized (its ``ignore`` list: they stay so), none for another."""
    fmt = model.config.fp8
    files = _checkpoint_files(ckpt)
    scales = _weight_scales(files) if fmt is not None else {}
    skipped = fp8_checkpoint.WEIGHT_SCALES + fp8_checkpoint.UNUSED_SCALES
    expected = {id(p): n for n, p in model.named_parameters()}
    filled: set[int] = set()
    partial: dict[int, int] = {}  # fused params filled shard by shard
    seen: dict[str, str] = {}  # checkpoint tensor -> the file it came from
    unknown: list[str] = []
    tied_head: torch.Tensor | None = None  # a tied model's lm_head.weight, if the file has one
    not_fp8: set[int] = set()
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                if name in seen:
                    raise ValueError(f"{ckpt}: {name} is in both {seen[name]} and {file.name}")
                seen[name] = file.name
                if name.rpartition(".")[2] in skipped:  # (a scale: read with its weight)
                    if fmt is None:
                        raise ValueError(f"{file.name}: {name} is an fp8 checkpoint's scale, "
                                         "but config.json declares no quantization_config")
                    continue
                target = _target(name, model)
                if target is None and name == "lm_head.weight":  # tied: must be the embedding
                    tied_head = torch.empty_like(model.embed_tokens)
                    target = _Target(tied_head, model.vocab_shard, None)
                    _read_into(target, _checkpoint_tensor(f, name, file, fmt, scales), name,
                               file)
                    continue
                if target is None:
                    if not name.endswith(_IGNORED):
                        unknown.append(name)
                    continue
                tensor = _checkpoint_tensor(f, name, file, fmt, scales)
                _read_into(target, tensor, name, file)
                key = id(target.param if target.owner is None else target.owner)
                if fmt is not None and not isinstance(tensor, _InMemory):  # (not fp8)
                    not_fp8.add(key)
                if target.part is None and target.owner is None:
                    filled.add(key)
                else:
                    partial[key] = partial.get(key, 0) + 1
    needed = _parts_needed(model)
    filled.update(pid for pid, count in partial.items() if count == needed[pid])
    if unknown:
        cfg = model.config
        raise ValueError(f"checkpoint {ckpt} has tensors the model that config.json describes "
                         f"({cfg.architecture}, {cfg.num_hidden_layers} layers) has no parameter "
                         f"for: {unknown[:8]}" + (" ..." if len(unknown) > 8 else ""))
    missing = [n for pid, n in expected.items() if pid not in filled]
    if missing:
        raise ValueError(f"checkpoint {ckpt} lacks weights for: {missing[:8]}"
                         + (" ..." if len(missing) > 8 else ""))
    if tied_head is not None and not torch.equal(tied_head, model.embed_tokens):
        raise ValueError(f"checkpoint {ckpt}: config.json ties the output layer to the "
                         "embeddings (tie_word_embeddings), but its lm_head.weight differs from "
                         "model.embed_tokens.weight (transformers 5 serves that lm_head, untied): "
                         "set tie_word_embeddings to false in config.json to serve it")
    return not_fp8


def fill_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights of realistic scale, the same for a seed whatever the tensor-parallel size:
    a sharded parameter is drawn whole (the TP=1 shape, so the generator advances as at TP=1 and
    the values match) and this rank keeps its slice; one full parameter at a time is transient."""
    gen = torch.Generator(device=model.embed_tokens.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(("layernorm.weight", "_norm.weight")) or name == "norm.weight":
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            shard = _shard_of(model, name)
            if shard is None or shard.is_whole:
                param.normal_(0.0, 0.02, generator=gen)
                continue
            full = param.new_empty(shard.full_shape(tuple(param.shape)))
            full.normal_(0.0, 0.02, generator=gen)
            _copy_shard(param, shard, (0, shard.full_size),
                        lambda offset, n: full.narrow(shard.dim, offset, n))
            del full  # freed before the next parameter's is drawn
