"""All engine configuration in one place: dataclasses validated on construction, and their CLI.

Every field carries its help text in ``metadata``; ``add_engine_args`` turns the dataclasses into
argparse options (``max_num_seqs`` -> ``--max-num-seqs``) so the CLI and the Python API can never
drift apart. Nothing here reads environment variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings
_KV_DTYPES = ("auto", "fp8")
_KV_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}  # vLLM's spelling of the same format
# --quantization: fp8 (FP8 weights); each is also the quant_method of FP8 checkpoints the loader
# reads (model/fp8_checkpoint.py), as vLLM names them
QUANTIZATIONS = ("fp8", "fbgemm_fp8", "compressed-tensors")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_BACKENDS = ("auto", "torch", "triton")


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_types(config: Any) -> None:
    """TypeError for a field whose value is not of its annotated type (``max_num_seqs="8"``,
    ``enforce_eager="no"``), ValueError for a float that is not finite; ints pass as floats,
    bools pass only as bools."""
    for f in dataclasses.fields(config):
        value, annotation = getattr(config, f.name), str(f.type)
        if value is None and annotation.endswith("| None"):
            continue
        kind = annotation.split(" |")[0]
        if kind == "dict":  # its section's own parser checks it (client_weights)
            continue
        expected = {"bool": bool, "int": numbers.Integral, "float": numbers.Real, "str": str}[kind]
        if not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool)):
            allowed = kind + (" or None" if annotation.endswith("| None") else "")
            raise TypeError(f"{f.name} must be {allowed}, got {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")


@dataclass
class ModelConfig:
    model: str = _opt(
        "fairswitch-tiny",
        "HF checkpoint directory, the embedded default 'fairswitch-tiny', a shipped config name "
        "(llama-3-8b, llama-3.1-8b, llama-3-70b, qwen2.5-7b, qwen2.5-32b, qwen3-8b) with "
        "--load-format dummy, or a Hugging Face Hub repository (owner/name, fetched into the "
        "Hub's cache; HF_TOKEN for gated ones, HF_HUB_OFFLINE=1 for the cache alone)",
    )
    tokenizer: str | None = _opt(None, "tokenizer directory (default: the model's)")
    revision: str | None = _opt(
        None, "a Hub model's branch, tag or commit (default: its main branch)")
    download_dir: str | None = _opt(
        None, "where Hub models are fetched to (default: the Hugging Face cache, HF_HOME)")
    load_format: str = _opt(
        "auto", "auto: read *.safetensors; dummy: random weights from the config", _LOAD_FORMATS
    )
    dtype: str = _opt(
        "auto", "weight/activation dtype. auto: on CUDA the dtype the checkpoint's config.json "
        "declares (dtype or torch_dtype), bfloat16 where that is float32 or absent; float32 on "
        "CPU (vLLM's half and float: float16 and float32)", (*_DTYPES, *_DTYPE_ALIASES))
    quantization: str | None = _opt(
        None, "fp8: the decoder's projections quantized to float8_e4m3fn on load (a scale per "
        "projection; each token's input quantized per step at its own), as vLLM's "
        "--quantization fp8 on a bf16 checkpoint: half their bytes (default: none; an FP8 "
        "checkpoint, per tensor, channel or block, is served so without it; its method's "
        "name, fbgemm_fp8 or compressed-tensors, is taken for it as by vLLM)", QUANTIZATIONS)
    trust_remote_code: bool = _opt(
        False, "taken for vLLM's command lines, and changes nothing: no code from a checkpoint "
        "ever runs (only the built-in architectures load)")
    device: str = _opt("auto", "cuda, cuda:N or cpu (auto: cuda when available)")
    max_model_len: int | None = _opt(None, "max prompt+output tokens (default: the model's)")
    seed: int = _opt(0, "seed for dummy weights and for sampling without a per-request seed")
    attention_backend: str = _opt(
        "auto", "auto: Triton kernels on CUDA, pure torch on CPU", _BACKENDS)
    enforce_eager: bool = _opt(False, "never use CUDA graphs")
    mixed_cuda_graphs: bool = _opt(
        True, "CUDA graphs also for steps with prompt tokens (up to 512 tokens), per (tokens, "
        "sequences) bucket; off: only decode-only steps are graphed")
    tensor_parallel_size: int = _opt(
        1, "GPUs (or CPU processes) the model is split over, Megatron-style: each rank holds its "
        "share of the heads, of the MLP and of the vocabulary, and of every KV block; the "
        "engine starts the other ranks itself (NCCL on CUDA with a GPU per rank, else gloo)")
    distributed_timeout_s: float = _opt(
        600.0, "tensor parallelism: how long a rank may take to join a collective (start-up, "
        "first-step compiles and graph capture included); a rank that dies or does not answer "
        "in time fails the engine: the requests in flight get an error and every rank stops")
    generation_config: str = _opt(
        "auto", "sampling defaults of requests that leave them unset (temperature, top_p, top_k, "
        "min_p, repetition_penalty; max_new_tokens bounds max_tokens), as vLLM: auto: from the "
        "checkpoint's generation_config.json; vllm: the built-in ones; or a folder holding a "
        "generation_config.json")
    freeze_gc: bool = _opt(
        True, "serving (server, bench): after start-up, move every live object to the garbage "
        "collector's permanent generation, so that full collections skip the hundreds of "
        "thousands of objects of torch and the model (otherwise each one pauses a step)")

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.generation_config.strip():
            raise ValueError("generation_config must be 'auto', 'vllm' or a folder, got ''")
        if not self.model.strip():  # (Path("") is the working directory)
            raise ValueError("model must be a checkpoint directory or a model name, "
                             f"got {self.model!r}")
        self.dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or "
                             f"None, got {self.quantization!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.distributed_timeout_s > 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class CacheConfig:
    block_size: int | None = _opt(
        None, "tokens per KV block (default: 16; 32 with --kv-cache-dtype fp8, whose decode "
        "kernel reads a 32-token page of a head faster than two 16-token ones)")
    num_gpu_blocks: int | None = _opt(
        None, "number of KV blocks on the device (overrides the memory-based sizing)"
    )
    gpu_memory_utilization: float = _opt(
        0.9, "fraction of GPU memory the engine may use (weights + activations + KV cache)"
    )
    kv_cache_memory_gib: float | None = _opt(
        None, "KV cache size in GiB, at most what --max-num-seqs requests of --max-model-len "
        "tokens fill (default on CPU: 1; on CUDA: from --gpu-memory-utilization)"
    )
    kv_cache_dtype: str = _opt(
        "auto", "KV cache element type: auto (the model's dtype) or fp8 (e4m3 with a scale per "
        "layer for K and for V: half the bytes of bf16, so twice the tokens, and every swap "
        "moves half as much; vLLM's fp8_e4m3 is the same)", (*_KV_DTYPES, *_KV_DTYPE_ALIASES))
    block_groups: bool = _opt(
        True, "allocate runs of consecutive blocks sized to each request's expected length")
    enable_prefix_caching: bool = _opt(
        True, "keep finished requests' KV keyed by token prefix and reuse it (multi-turn)")
    swap_space: float = _opt(
        4.0, "CPU swap space in GiB for the KV of preempted requests (0: never swap, recompute)"
    )
    swap_copy_backend: str = _opt(
        "auto", "swap copies: torch (CUDA streams), cupy (raw memcpyAsync per extent; needs "
        "cupy), auto (cupy on CUDA when installed, else torch)", ("auto", "torch", "cupy"))
    async_swap: bool = _opt(True, "swap copies overlap compute (off: the step waits for them)")
    duplex_swap: bool = _opt(
        True, "full duplex: swap-outs on a device-to-host stream, swap-ins and CPU-tier fetches "
        "on a host-to-device stream, so both directions move at once and a swap-in never waits "
        "behind a swap-out (off: one stream for both, as before)")
    early_swap_in: bool = _opt(
        False, "a resumed request (swap-in or CPU-tier fetch) runs in the step its copy is "
        "issued, the compute stream waiting for the copy on the device, instead of joining "
        "the step after the host sees the copy done")
    incremental_swap: bool = _opt(
        True, "keep a resumed request's CPU copy so its next swap-out moves only new blocks")
    per_layer_swap: bool = _opt(
        False, "one copy per block per layer per K/V instead of one per extent (ablation)")
    cpu_kv_reuse: bool | None = _opt(
        None, "multi-turn reuse's CPU tier: finished requests' KV is also copied to the swap "
        "space in the background, and a later prompt continuing it fetches it instead of "
        "recomputing (needs prefix caching and swap space; default: on where both are)")
    baseline: bool = _opt(
        False, "reproduce vLLM 0.3.3's context switches: block size 16, per-block-per-layer "
        "synchronous copies on one stream, no block groups, no incremental swap, no prefix "
        "caching (overrides those options)")

    def __post_init__(self) -> None:
        _check_types(self)
        if self.baseline:  # (its 16-token blocks: tokens_per_block, the field left as given)
            self.enable_prefix_caching, self.block_groups = False, False
            self.cpu_kv_reuse = False
            self.async_swap, self.incremental_swap, self.per_layer_swap = False, False, True
            self.duplex_swap = False
        if self.block_size is not None and (self.block_size < 1
                                            or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if self.swap_copy_backend not in ("auto", "torch", "cupy"):
            raise ValueError("swap_copy_backend must be one of auto, torch, cupy, got "
                             f"{self.swap_copy_backend!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        self.kv_cache_dtype = _KV_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if self.kv_cache_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of auto, fp8 (e4m3; also fp8_e4m3), "
                             f"got {self.kv_cache_dtype!r}")
        if self.cpu_kv_reuse and not (self.enable_prefix_caching and self.swap_space > 0):
            raise ValueError("cpu_kv_reuse is the prefix cache's tier in the swap space: it needs "
                             "enable_prefix_caching and swap_space > 0")

    @property
    def tokens_per_block(self) -> int:
        """The block size in use: 16 under ``baseline``, else ``block_size``, or where that is
        None the default for the cache's element type. The field is never overwritten, so a copy
        that changes the dtype or drops ``baseline`` (``with_options``, an ablation) takes the
        block size it implies."""
        if self.baseline:
            return 16
        if self.block_size is not None:
            return self.block_size
        return 32 if self.kv_cache_dtype == "fp8" else 16

    @property
    def cpu_kv_reuse_on(self) -> bool:
        """The CPU tier of reuse runs (where the swap space holds a block): asked for, or left
        to its default with prefix caching on."""
        return self.enable_prefix_caching and self.cpu_kv_reuse is not False


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _opt(256, "max requests running in one step")
    max_num_batched_tokens: int = _opt(
        2048, "token budget of one step; longer prompts are prefilled in chunks"
    )
    enable_chunked_prefill: bool = _opt(
        True, "taken for vLLM's command lines: prompts are always split across steps by "
        "max_num_batched_tokens, mixed with decodes (false is refused)")
    max_waiting: int | None = _opt(
        None, "max queued requests; more are refused (the server's 503; LLM.generate queues "
        "the rest as the queue frees) (default: no cap)")
    growth_headroom: int = _opt(
        1, "KV blocks kept free per running request when a queued request is admitted or "
        "resumed: room for the batch to grow, so that a resumed request does not push another "
        "out a few steps later (0: admit whenever the request itself fits)")
    preemption_mode: str = _opt(
        "auto", "how a preempted request gives up its KV: auto (cheaper by the cost model), "
        "swap (to CPU; needs swap space, recompute while it is full), recompute",
        ("auto", "swap", "recompute"))
    swap_link_gb_s: float = _opt(
        25.0, "host link bandwidth the swap cost model starts from (GB/s); replaced by a probe "
        "copy when the swap space is set up")
    prefill_tokens_per_s: float = _opt(
        20000.0, "prefill throughput the recompute cost model starts from (tokens/s); then a "
        "moving average of the engine's prefill-heavy steps")
    async_scheduling: bool = _opt(
        True, "schedule and launch the next step while the GPU runs this one (its requests' new "
        "tokens stand in as placeholders, read on the device); applies with asynchronous swaps "
        "only: with synchronous ones (--baseline, --no-async-swap) every step runs its phases in turn")
    policy: str = _opt(
        "fcfs", "who runs first: fcfs, priority (per-request, lower first), vtc (per-client "
        "virtual token counters), trace (priorities redrawn while requests run)",
        ("fcfs", "priority", "vtc", "trace"))
    preempt_threshold: float | None = _opt(
        None, "a queued request preempts a running one only if it ranks better by more than this "
        "(score units: seconds for fcfs, levels for priority/trace, service for vtc; default: 0, "
        "and for vtc the service of one full step at the output weight, vtc_output_weight x "
        "max_num_batched_tokens)")
    min_run_steps: int = _opt(
        4, "steps a request runs after (re)admission before a better-ranked one may preempt it")
    max_starvation_s: float | None = _opt(
        60.0, "a request kept out of the batch longer than this ranks first until it has run "
        "min_run_steps and sampled a token (0: no bound)")
    vtc_input_weight: float = _opt(1.0, "VTC cost of one input (prefill) token")
    vtc_output_weight: float = _opt(2.0, "VTC cost of one output token")
    client_weights: dict | str | None = _opt(  # (a dict {"a": 2} from the Python API)
        None, "VTC client weights, e.g. 'a=2,b=1' (counters advance by cost / weight; default 1)")
    priority_updates: str = _opt(
        "random", "trace policy: how a priority changes: random (any level) or markov "
        "(a neighbouring level)", ("random", "markov"))
    priority_update_prob: float = _opt(
        0.01, "trace policy: probability that a request's priority changes in one iteration")
    num_priority_levels: int = _opt(4, "trace policy: priority levels 0 (best) .. K-1")
    priority_update_seed: int = _opt(0, "trace policy: seed of the priority updates")

    def __post_init__(self) -> None:
        _check_types(self)
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.growth_headroom < 0:
            raise ValueError(f"growth_headroom must be >= 0, got {self.growth_headroom}")
        if not self.enable_chunked_prefill:
            raise ValueError("enable_chunked_prefill cannot be turned off: prompts are always "
                             "split across steps by max_num_batched_tokens (give that more "
                             "tokens for fewer chunks)")
        if self.max_waiting is not None and self.max_waiting < 1:  # 0: nothing could ever run
            raise ValueError(f"max_waiting must be >= 1 (default: no cap), got {self.max_waiting}")
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise ValueError("preemption_mode must be one of auto, swap, recompute, got "
                             f"{self.preemption_mode!r}")
        if self.swap_link_gb_s <= 0 or self.prefill_tokens_per_s <= 0:
            raise ValueError("swap_link_gb_s and prefill_tokens_per_s must be > 0")
        if self.policy not in ("fcfs", "priority", "vtc", "trace"):
            raise ValueError(f"policy must be one of fcfs, priority, vtc, trace, got {self.policy!r}")
        if (self.preempt_threshold is not None and self.preempt_threshold < 0) \
                or self.min_run_steps < 0:
            raise ValueError("preempt_threshold and min_run_steps must be >= 0")
        if self.max_starvation_s is not None and self.max_starvation_s < 0:
            raise ValueError(f"max_starvation_s must be >= 0, got {self.max_starvation_s}")
        if self.vtc_input_weight < 0 or self.vtc_output_weight < 0:
            raise ValueError("vtc_input_weight and vtc_output_weight must be >= 0")
        if self.priority_updates not in ("random", "markov"):
            raise ValueError("priority_updates must be random or markov, got "
                             f"{self.priority_updates!r}")
        if not 0.0 <= self.priority_update_prob <= 1.0:
            raise ValueError(f"priority_update_prob must be in [0, 1], got "
                             f"{self.priority_update_prob}")
        if self.num_priority_levels < 1:
            raise ValueError(f"num_priority_levels must be >= 1, got {self.num_priority_levels}")
        parse_client_weights(self.client_weights)  # raises naming the bad client


def parse_client_weights(spec: dict | str | None) -> dict[str, float]:
    """``"a=2,b=1"`` (the CLI's form) or ``{"a": 2, "b": 1}`` -> {"a": 2.0, "b": 1.0}. Each weight
    is a finite number > 0: ValueError (TypeError for a wrong type) naming its client."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for item in spec.split(","):
            if not item.strip():
                continue
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"client weight {item!r} is not CLIENT=WEIGHT")
            try:
                items.append((name.strip(), float(value)))
            except ValueError:
                raise ValueError(f"client weight of {name.strip()!r} must be a number, "
                                 f"got {value.strip()!r}") from None
    else:
        raise TypeError("client_weights must be a dict of client -> weight, a 'CLIENT=WEIGHT,...' "
                        f"string or None, got {spec!r}")
    weights: dict[str, float] = {}
    for name, weight in items:
        if not isinstance(name, str):
            raise TypeError(f"client_weights' client ids must be strings, got {name!r}")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool):
            raise TypeError(f"client weight of {name!r} must be a number, got {weight!r}")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"client weight of {name!r} must be a finite number > 0, "
                             f"got {weight!r}")
        weights[name] = float(weight)
    return weights


@dataclass
class LoRAConfig:
    enable_lora: bool = _opt(
        False, "serve LoRA adapters beside the base model (a request names one: LoRARequest, "
        "or the server's model name of one of --lora-modules)")
    max_loras: int = _opt(
        1, "adapters a step can mix (slots on the device; a request whose adapter finds no "
        "free slot waits for one)")
    max_lora_rank: int = _opt(16, "the largest adapter rank served (slots are this wide)")
    max_cpu_loras: int | None = _opt(
        None, "adapters kept read in host memory for requests to come (default: max_loras); "
        "others are read from their folder again when next used")

    def __post_init__(self) -> None:
        _check_types(self)
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "lora": LoRAConfig}


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        # What one section asks of another. (vLLM fails at the first preemption instead.)
        if self.scheduler.preemption_mode == "swap" and self.cache.swap_space == 0:
            raise ValueError("preemption_mode 'swap' needs swap space, and swap_space is 0: "
                             "give swap_space > 0, or preemption_mode recompute or auto")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Flat keyword arguments (``model=..., block_size=...``) -> nested config."""
        parts = _by_section(kwargs)
        return cls(**{name: klass(**parts[name]) for name, klass in _SECTIONS.items()})

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        return cls.from_kwargs(**{k: getattr(args, k) for k in _all_fields() if hasattr(args, k)})

    def with_options(self, **kwargs: Any) -> EngineConfig:
        """A copy with flat options replaced (``max_num_seqs=..., block_size=...``), validated
        again (``baseline`` re-applies what it implies)."""
        parts = _by_section(kwargs)
        return EngineConfig(**{name: dataclasses.replace(getattr(self, name), **parts[name])
                               for name in _SECTIONS})


def _all_fields() -> dict[str, str]:
    return {f.name: section for section, klass in _SECTIONS.items()
            for f in dataclasses.fields(klass)}


def _section_of(key: str) -> str | None:
    return _all_fields().get(key)


def _by_section(kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat options grouped by the config section that holds each; TypeError for unknown ones."""
    parts: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in kwargs.items():
        section = _section_of(key)
        if section is None:
            raise TypeError(f"unknown engine option {key!r}; known: {sorted(_all_fields())}")
        parts[section][key] = value
    return parts


def _arg_type(f: dataclasses.Field) -> Any:
    annotation = str(f.type)
    if annotation.split(" |")[0] == "bool":
        return None
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def add_engine_args(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Add one option per config field, with its help text and default; returns the options
    added, by field name."""
    actions: dict[str, argparse.Action] = {}
    for section, klass in _SECTIONS.items():
        group = parser.add_argument_group(f"engine ({section})")
        for f in dataclasses.fields(klass):
            default = f.default if f.default is not dataclasses.MISSING else None
            flag = "--" + f.name.replace("_", "-")
            help = f.metadata["help"]
            if "default" not in help:  # a help text that explains its default says it once
                help += f" (default: {default})"
            if _arg_type(f) is None:
                action = group.add_argument(flag, dest=f.name,
                                            action=argparse.BooleanOptionalAction,
                                            default=default, help=help)
                action.help = help  # Python < 3.11 appends its own "(default: ...)"
            else:
                action = group.add_argument(flag, dest=f.name, type=_arg_type(f),
                                            default=default, choices=f.metadata.get("choices"),
                                            help=help)
            actions[f.name] = action
    return actions
