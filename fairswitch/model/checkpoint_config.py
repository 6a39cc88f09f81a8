"""A checkpoint's ``config.json``: the decoder's shape, read without importing transformers.

Importing transformers' config classes pulls in most of transformers and torch.distributed (over
a second of start-up on a small CPU). The Llama family needs a dozen fields; this reads them with
the defaults transformers' config classes give when a field is absent, so a checkpoint means the
same here as there (tests/test_loader.py compares both on every shipped config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairswitch.model.fp8_checkpoint import Fp8Checkpoint, read_quantization_config

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                           "Qwen3MoeForCausalLM")
_QK_NORM = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")  # an RMSNorm over each q and k head
_ATTENTION_BIAS = ("LlamaForCausalLM", *_QK_NORM)  # (the ones that read attention_bias)

# transformers' defaults that differ between the model types (LlamaConfig, MistralConfig,
# Qwen2Config, Qwen3Config, Phi3Config, MixtralConfig, Qwen3MoeConfig): KV heads (None: as many
# as query heads), context length, sliding window, head size (None: hidden_size //
# num_attention_heads), norm epsilon (1e-6).
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048,
              "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768,
              "sliding_window": 4096, "use_sliding_window": False},
    "qwen3": {"num_key_value_heads": 32, "max_position_embeddings": 32768,
              "sliding_window": 4096, "use_sliding_window": False, "head_dim": 128},
    "phi3": {"num_key_value_heads": None, "max_position_embeddings": 4096,
             "sliding_window": None, "rms_norm_eps": 1e-5},
    "mixtral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                "sliding_window": None, "rms_norm_eps": 1e-5},
    "qwen3_moe": {"num_key_value_heads": 4, "max_position_embeddings": 32768,
                  "sliding_window": 4096, "use_sliding_window": False},
}
_QWEN_WINDOWS = ("qwen2", "qwen3", "qwen3_moe")  # (use_sliding_window read)
_MAX_WINDOW_LAYERS = ("qwen2", "qwen3")  # (and max_window_layers: Qwen3-MoE slides on all)
_ACTIVATIONS = ("silu", "swish")  # the MLP's gate activation (the same function)
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")
_COUNTS = (*_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings")
# The RoPE variants llama.py implements, and the numbers each one reads (longrope: Phi-3's, its
# per-dimension factors checked apart, in _check_longrope).
_ROPE_PARAMS = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"),
                "longrope": ("original_max_position_embeddings",)}
WEIGHT_DTYPES = ("float32", "float64", "float16", "bfloat16")  # the dtypes a checkpoint may declare


def read_json(path: Path) -> Any:
    """The JSON in the file ``path``; ValueError naming the file if it is not UTF-8 JSON."""
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _check_types(raw: dict[str, Any], where: str) -> None:
    """A field of the wrong type or range is refused here, naming it, not cast (``int(64.5)``)
    or left to fail as a shape error or a traceback deep in the model."""
    for key in _COUNTS:
        value = raw.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    eps = raw.get("rms_norm_eps")
    if eps is not None and (type(eps) not in (int, float) or not eps > 0):
        raise ValueError(f"{where}: rms_norm_eps must be a positive number, got {eps!r}")
    for key in ("rope_parameters", "rope_scaling"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"{where}: {key} must be an object, got {raw[key]!r}")
    for key in ("eos_token_id", "bos_token_id"):
        check_token_ids(raw.get(key), key, where, many=key == "eos_token_id")


def check_token_ids(value: Any, key: str, where: str, many: bool) -> None:
    """``value`` (of ``key`` in the file ``where``) is None, a token id, or with ``many`` a list
    of them; else ValueError naming it (a negative id would index the logits from the end)."""
    ids = value if isinstance(value, list) and many else [value]
    if value is not None and not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError(f"{where}: {key} must be a token id{' or a list of them' if many else ''}"
                         f", got {value!r}")


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP blocks of a mixture-of-experts model: each token's MLP output is the sum
    of ``top_k`` of ``num_experts`` SwiGLU experts (``intermediate_size`` each), weighted by the
    router's softmax over them (renormalized over the top k where ``norm_topk_prob``).
    ``sparse_layers``: the layers with experts; the others have the dense MLP."""
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: frozenset[int]

    @classmethod
    def read(cls, raw: dict[str, Any], model_type: str, num_layers: int,
             where: str) -> MoeConfig | None:
        """As MixtralConfig (every layer sparse, always renormalized, experts of
        ``intermediate_size``) and Qwen3MoeConfig (``moe_intermediate_size``, layers by
        ``decoder_sparse_step`` but ``mlp_only_layers``, ``norm_topk_prob``) read them; None
        for a dense model type."""
        if model_type not in _MOE_DEFAULTS:
            return None
        defaults = _MOE_DEFAULTS[model_type]
        fixed = defaults.get("fixed", ())
        get = lambda key: (raw[key] if key not in fixed and raw.get(key) is not None  # noqa: E731
                           else defaults[key])
        # (transformers maps num_experts to num_local_experts for both)
        experts = raw.get("num_experts", raw.get("num_local_experts"))
        experts = defaults["num_experts"] if experts is None else experts
        counts = {"num_experts": experts, "num_experts_per_tok": get("num_experts_per_tok"),
                  "decoder_sparse_step": get("decoder_sparse_step")}
        counts["moe_intermediate_size"] = (raw["intermediate_size"] if model_type == "mixtral"
                                           else get("moe_intermediate_size"))
        for key, value in counts.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
        if counts["num_experts_per_tok"] > experts:
            raise ValueError(f"{where}: num_experts_per_tok={counts['num_experts_per_tok']} is "
                             f"more than the {experts} experts")
        dense = get("mlp_only_layers")
        if not isinstance(dense, list) or not all(
                type(i) is int and 0 <= i < num_layers for i in dense):
            raise ValueError(f"{where}: mlp_only_layers must be a list of layer indices "
                             f"(0 to {num_layers - 1}), got {dense!r}")
        norm = get("norm_topk_prob")
        if type(norm) is not bool:
            raise ValueError(f"{where}: norm_topk_prob must be true or false, got {norm!r}")
        step = counts["decoder_sparse_step"]
        return cls(num_experts=experts, top_k=counts["num_experts_per_tok"],
                   intermediate_size=counts["moe_intermediate_size"], norm_topk_prob=norm,
                   sparse_layers=frozenset(i for i in range(num_layers)
                                           if i not in dense and (i + 1) % step == 0))

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx in self.sparse_layers


# transformers' defaults for the experts; "fixed": what the model type does whatever the file
# says (Mixtral has no such fields: every layer sparse, always renormalized).
_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "norm_topk_prob": True,
                "fixed": ("decoder_sparse_step", "mlp_only_layers", "norm_topk_prob")},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": False, "moe_intermediate_size": 768},
}


@dataclass(frozen=True)
class CheckpointConfig:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # rope_type and its parameters; None: plain RoPE
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama and Qwen3 when attention_bias says so
    o_proj_bias: bool  # Llama and Qwen3 when attention_bias says so (Mistral, Qwen2 ignore it)
    qk_norm: bool  # Qwen3: an RMSNorm over each query and key head before RoPE
    sliding_window: int | None  # None: full attention
    eos_token_id: int | list[int] | None
    bos_token_id: int | None
    dtype: str | None  # one of WEIGHT_DTYPES, as the checkpoint declares it; None: it does not
    raw: dict[str, Any] = field(repr=False, compare=False)  # config.json as read
    fp8: Fp8Checkpoint | None = None  # an FP8 checkpoint's format (model/fp8_checkpoint.py)
    moe: MoeConfig | None = None  # a mixture-of-experts model's experts (Mixtral, Qwen3-MoE)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> CheckpointConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            raise ValueError(f"{where}: architectures must be a list, got {archs!r}")
        if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {archs[0] if archs else None!r} in {where} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        model_type = raw.get("model_type")
        if model_type not in _TYPE_DEFAULTS:
            raise ValueError(f"{where}: model_type {model_type!r} is not one of "
                             f"{', '.join(_TYPE_DEFAULTS)}")
        missing = [k for k in _REQUIRED if raw.get(k) is None]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        _check_types(raw, where)
        defaults = _TYPE_DEFAULTS[model_type]
        get = lambda key, default=None: raw[key] if raw.get(key) is not None else default  # noqa: E731
        if get("hidden_act", "silu") not in _ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported "
                             f"(only {' / '.join(_ACTIVATIONS)})")
        if get("mlp_bias", False):
            raise ValueError(f"{where}: mlp_bias is not supported")
        quant = raw.get("quantization_config")  # (fp8 weights; any other: refused here)
        fp8 = None if quant is None else read_quantization_config(quant, where)
        heads = int(raw["num_attention_heads"])
        # transformers 5 writes rope_parameters (with rope_theta inside), 4.x rope_scaling.
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.pop("rope_theta", get("rope_theta", 10000.0))
        if type(theta) not in (int, float) or not theta > 0:
            raise ValueError(f"{where}: rope_theta must be a positive number, got {theta!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_type = "longrope" if rope_type == "su" else rope_type  # (Phi-3's first name for it)
        if rope_type == "longrope":
            rope["rope_type"] = rope_type
            if model_type == "phi3":  # (as Phi3Config: its own field wins, 4096 by default)
                rope["original_max_position_embeddings"] = get(
                    "original_max_position_embeddings", 4096)
        partial = rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor={partial!r} (RoPE on part of each "
                             "head) is not supported")
        rope.pop("partial_rotary_factor", None)
        if rope_type not in _ROPE_PARAMS:
            raise ValueError(f"{where}: rope type {rope_type!r} is not supported "
                             f"(supported: {', '.join(_ROPE_PARAMS)})")
        if absent := [k for k in _ROPE_PARAMS[rope_type] if k not in rope]:
            raise ValueError(f"{where}: {rope_type} rope scaling lacks {', '.join(absent)}")
        for key in _ROPE_PARAMS[rope_type]:
            if type(rope[key]) not in (int, float) or not 0 < rope[key] < float("inf"):
                raise ValueError(f"{where}: the {rope_type} rope scaling's {key} must be a "
                                 f"positive number, got {rope[key]!r}")
        layers = int(raw["num_hidden_layers"])
        attention_bias = archs[0] in _ATTENTION_BIAS and bool(
            get("attention_bias", False))
        config = cls(
            architecture=archs[0], model_type=model_type,
            hidden_size=int(raw["hidden_size"]), intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers, num_attention_heads=heads,
            # (an explicit null means "as many as query heads", as in transformers)
            num_key_value_heads=int(raw["num_key_value_heads"] or heads
                                    if "num_key_value_heads" in raw
                                    else defaults["num_key_value_heads"] or heads),
            head_dim=int(get("head_dim", defaults.get("head_dim")
                             or int(raw["hidden_size"]) // heads)),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(get("max_position_embeddings",
                                            defaults["max_position_embeddings"])),
            rms_norm_eps=float(get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6))),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # As transformers' models: Qwen2 has q/k/v biases, Mistral none, whatever
            # attention_bias says (a checkpoint they wrote has no such tensors).
            qkv_bias=archs[0] == "Qwen2ForCausalLM" or attention_bias,
            o_proj_bias=attention_bias, qk_norm=archs[0] in _QK_NORM,
            sliding_window=_sliding_window(raw, defaults, layers, where),
            eos_token_id=get("eos_token_id"), bos_token_id=get("bos_token_id"),
            dtype=_weight_dtype(raw, where), raw=raw, fp8=fp8,
            moe=MoeConfig.read(raw, model_type, layers, where))
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{where}: num_attention_heads={config.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads={config.num_key_value_heads}")
        if config.head_dim % 2 or not config.head_dim:  # RoPE rotates pairs of dimensions
            implied = "" if "head_dim" in raw else " (hidden_size // num_attention_heads)"
            raise ValueError(f"{where}: head_dim={config.head_dim}{implied} is not a positive "
                             "even number")
        if rope_type == "longrope":
            _check_longrope(rope, config.head_dim, where)
        return config

    @classmethod
    def from_file(cls, path: Path) -> CheckpointConfig:
        return cls.from_dict(read_json(path), str(path))


def _check_longrope(rope: dict[str, Any], head_dim: int, where: str) -> None:
    """Phi-3's LongRoPE: a factor per pair of dimensions for contexts up to
    ``original_max_position_embeddings`` (short) and past it (long)."""
    for key in ("short_factor", "long_factor"):
        factors = rope.get(key)
        if (not isinstance(factors, list) or len(factors) != head_dim // 2 or not all(
                type(f) in (int, float) and 0 < f < float("inf") for f in factors)):
            raise ValueError(f"{where}: longrope's {key} must be a list of {head_dim // 2} "
                             f"positive numbers (one per pair of a head's dimensions)")
    for key in ("factor", "attention_factor"):
        value = rope.get(key)
        if value is not None and (type(value) not in (int, float) or not value > 0):
            raise ValueError(f"{where}: longrope's {key} must be a positive number, got "
                             f"{value!r}")


def _weight_dtype(raw: dict[str, Any], where: str) -> str | None:
    """The weights' dtype the checkpoint declares, as transformers reads it: ``dtype``
    (transformers 5), else ``torch_dtype`` (4.x); an explicit null is no declaration."""
    key = "dtype" if raw.get("dtype") is not None else "torch_dtype"
    value = raw.get(key)
    if value is not None and value not in WEIGHT_DTYPES:
        raise ValueError(f"{where}: {key} must be one of {', '.join(WEIGHT_DTYPES)}, "
                         f"got {value!r}")
    return value


def _sliding_window(raw: dict[str, Any], defaults: dict[str, Any], num_layers: int,
                    where: str) -> int | None:
    """The attention window every layer uses (None: full attention), as transformers' models
    do: Llama never slides; Mistral slides on ``sliding_window`` whatever
    ``use_sliding_window`` says; Qwen2 and 3 only when ``use_sliding_window``, and only layers from
    ``max_window_layers`` on. ``layer_types`` says which layers, where present; an explicit null
    ``sliding_window`` is no window. One window for some layers and none for others is
    refused."""
    model_type = raw.get("model_type")
    if model_type == "llama":  # transformers' Llama attends to every position, whatever it says
        return None
    window = raw["sliding_window"] if "sliding_window" in raw else defaults["sliding_window"]
    use = raw.get("use_sliding_window")  # (only Qwen2 reads it: Mistral slides on the window)
    if window is None or (model_type in _QWEN_WINDOWS
                          and not (defaults["use_sliding_window"] if use is None else use)):
        return None
    if type(window) is not int or window < 1:
        raise ValueError(f"{where}: sliding_window must be a positive integer or null, got "
                         f"{window!r}")
    layer_types = raw.get("layer_types")  # (null: derived, as when absent)
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ValueError(f"{where}: layer_types must be a list, got {layer_types!r}")
        sliding = sum(t == "sliding_attention" for t in layer_types)
    elif model_type in _MAX_WINDOW_LAYERS:
        first = raw.get("max_window_layers", 28)
        if type(first) is not int or first < 0:
            raise ValueError(f"{where}: max_window_layers must be an integer >= 0, got "
                             f"{first!r}")
        sliding = max(0, num_layers - first)
    else:
        sliding = num_layers
    if sliding == 0:
        return None
    if sliding != num_layers:
        raise ValueError(f"{where}: a sliding window on {sliding} of {num_layers} layers is not "
                         "supported (one window for every layer, or none)")
    return window
