"""Assembles an engine's parts from an ``EngineConfig``, in the order they depend on each other:

    checkpoint config checked (weight files, heads split by the tensor-parallel size), tokenizer
    -> the other tensor-parallel ranks started (distributed/workers.py), if any
    -> build_rank, what every rank builds alike: model share (weights or dummy), ModelRunner,
       KVMemory (GPU pool sized from the runner's profiling step on CUDA, the minimum over the
       ranks; swap space, reuse tiers), runner bound to the pool (CUDA graphs), eager warm-up
    -> OutputProcessor (detokenize, stop checks), Scheduler (over KVMemory)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fairswitch.config import EngineConfig
from fairswitch.distributed.parallel_state import SINGLE, TPGroup
from fairswitch.distributed.shard_plan import ShardPlan
from fairswitch.distributed.workers import (RanksStoppedError, WorkerGroup, launched_rank,
                                             local_world_size, rank_device, serve_as_worker)
from fairswitch.engine.output_processor import OutputProcessor
from fairswitch.kv.kv_cache import KVLayout, kv_cache_dtype
from fairswitch.kv.memory import KVMemory, num_gpu_blocks
from fairswitch.lora.slots import AdapterSlots
from fairswitch.lora.store import AdapterStore
from fairswitch.lora.weights import attach_lora
from fairswitch.model import loader
from fairswitch.model.checkpoint_config import CheckpointConfig
from fairswitch.model.quantization import (check_fp8_weights, fp8_checkpoint_in_fp8,
                                           quantize_weights_fp8_)
from fairswitch.model.generation_config import GenerationConfig, read_generation_config
from fairswitch.runner.attention import get_attention_backend
from fairswitch.runner.jit_watch import JIT_CLOCK
from fairswitch.runner.model_runner import GraphPlan, ModelRunner
from fairswitch.runner.step_events import StepEvents
from fairswitch.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """The dtype ``--dtype name`` runs the model in. "auto" follows vLLM on CUDA: the dtype the
    checkpoint declares (``CheckpointConfig.dtype``) if it is float16 or bfloat16, else
    (float32, float64, none declared) bfloat16 (half the memory of float32, the range of float32);
    on the CPU it is float32, the dtype the engine's CPU path runs in."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    if checkpoint_dtype in ("float16", "bfloat16"):
        return _DTYPES[checkpoint_dtype]
    return torch.bfloat16


@dataclass
class EngineParts:
    device: torch.device
    dtype: torch.dtype
    hf_config: CheckpointConfig
    tokenizer: Any
    max_model_len: int
    runner: ModelRunner
    kv: KVMemory
    scheduler: Scheduler
    output_processor: OutputProcessor
    events: StepEvents
    workers: WorkerGroup | None  # the other tensor-parallel ranks
    generation: GenerationConfig  # EOS ids and requests' sampling defaults
    lora_store: AdapterStore | None  # LoRA adapters read for requests (enable_lora)


@dataclass
class RankParts:
    """What every tensor-parallel rank builds alike: its share of the model and of the KV pools."""
    dtype: torch.dtype
    hf_config: CheckpointConfig
    source: loader.ModelSource
    max_model_len: int
    runner: ModelRunner
    kv: KVMemory


def build_engine_parts(config: EngineConfig) -> EngineParts:
    JIT_CLOCK.serving = False  # compiles while building (warm-up, graph capture) are expected
    device = resolve_device(config.model.device)
    checked = check_model(config)  # before any rank starts
    # (a bad generation_config.json is named before any rank loads weights)
    generation = read_generation_config(checked[0].checkpoint_dir,
                                        config.model.generation_config)
    if defaults := generation.sampling_defaults():
        logger.info("sampling defaults from the model's generation_config.json (as vLLM; "
                    "--generation-config vllm: none): %s", defaults)
    # (and the tokenizer too: a bad one fails before the weights load and the workers start)
    tokenizer = loader.load_tokenizer(_tokenizer_path(config, checked[0]))
    workers = tp = None
    if config.model.tensor_parallel_size > 1:
        rank = launched_rank(config.model.tensor_parallel_size)
        if rank:  # a launcher's rank other than 0: a worker until the driver stops
            serve_as_worker(config, rank)
        workers = WorkerGroup(config, device)
        tp = workers.tp
        device = rank_device(device, 0)
    events = StepEvents()
    try:
        part = build_rank(config, tp or SINGLE, device, workers.agree if workers else None,
                          workers.copy_log if workers else None, events, checked)
        if workers is not None:  # its graphs go before it leaves the group, however it ends
            workers.release_graphs = part.runner.release_graphs
    except BaseException as e:
        if workers is not None:  # they may wait in a collective this rank never reaches
            workers.fail(e)
            if workers.exits() and isinstance(e, Exception):  # a worker's error caused it
                raise RanksStoppedError(f"tensor-parallel start-up failed "
                                        f"({workers.failure_cause(e)})") from e
        raise
    if workers is not None:
        part.runner.send_plan = workers.send
    eos_ids = _eos_ids(part.hf_config, tokenizer, generation)
    part.runner.sampler.eos_token_ids = eos_ids  # masked before a request's min_tokens
    output_processor = OutputProcessor(tokenizer, eos_ids, part.max_model_len)
    lc = config.lora
    adapters = AdapterSlots(lc.max_loras) if lc.enable_lora else None
    scheduler = Scheduler(config.scheduler, part.kv, output_processor, adapters=adapters)
    store = AdapterStore(part.hf_config, lc.max_lora_rank, lc.max_cpu_loras or lc.max_loras,
                         part.dtype) if lc.enable_lora else None
    JIT_CLOCK.serving = True
    return EngineParts(device, part.dtype, part.hf_config, tokenizer, part.max_model_len,
                       part.runner, part.kv, scheduler, output_processor, events, workers,
                       generation, store)


def check_model(config: EngineConfig) -> tuple[loader.ModelSource, CheckpointConfig]:
    """The model's source and checkpoint config, checked against the engine's: raises
    ValueError for a model without weights asked to load them, weight files that are missing
    or unreadable, a tensor-parallel size its heads do not divide, or LoRA with experts."""
    mc = config.model
    source = loader.resolve_model(mc.model, mc.revision, mc.download_dir,
                                  weights=mc.load_format != "dummy")
    if source.checkpoint_dir is None and mc.load_format != "dummy":
        raise ValueError(f"{mc.model!r} is a shipped config without weights: use "
                         "load_format='dummy' (--load-format dummy) or a checkpoint directory")
    hf_config = loader.load_checkpoint_config(source)
    ShardPlan.of(hf_config, mc.tensor_parallel_size)  # raises if the heads do not split
    if config.lora.enable_lora and hf_config.moe is not None:
        raise ValueError(f"LoRA adapters (enable_lora) are not supported for mixture-of-experts "
                         f"models ({hf_config.architecture})")
    if mc.load_format != "dummy":
        loader.check_weight_files(source.checkpoint_dir)  # (headers only)
    return source, hf_config


def build_rank(config: EngineConfig, tp: TPGroup, device: torch.device,
               agree: Callable[[int], int] | None = None, copy_log: list | None = None,
               events: StepEvents | None = None,
               checked: tuple[loader.ModelSource, CheckpointConfig] | None = None) -> RankParts:
    """Rank ``tp.rank``'s model share, runner and KV memory. ``agree``: the number of GPU
    blocks all ranks can hold, from this rank's own; ``copy_log``: the driver's swap-copy log;
    ``checked``: ``check_model(config)`` if the caller has it already."""
    mc, cc = config.model, config.cache
    # Every rank reads the same config.json (check_model), so all resolve rank 0's dtype.
    source, hf_config = checked if checked is not None else check_model(config)
    dtype = resolve_dtype(mc.dtype, device, hf_config.dtype)
    max_model_len = _max_model_len(hf_config, mc.max_model_len)
    backend = get_attention_backend(mc.attention_backend, device, cc.kv_cache_dtype)
    if backend.name == "triton":  # (the torch backend runs no Triton kernel to time)
        if cc.tokens_per_block < 8:
            raise ValueError(f"block_size={cc.tokens_per_block}: the Triton attention kernels "
                             "need block_size >= 8")
        JIT_CLOCK.install()
    if mc.quantization not in (None, "fp8") and (
            hf_config.fp8 is None or hf_config.fp8.method != mc.quantization):
        raise ValueError(f"quantization={mc.quantization!r} names an FP8 checkpoint's method, "
                         f"but {mc.model}'s config.json declares "
                         f"{hf_config.fp8.method if hf_config.fp8 else 'no quantization'}")
    fp8_weights = mc.quantization is not None
    if fp8_weights:  # (before the weights load)
        check_fp8_weights(device, dtype)
    elif hf_config.fp8 is not None:  # an FP8 checkpoint: in fp8 where the device can
        fp8_weights = fp8_checkpoint_in_fp8(device, dtype)
    t0 = time.perf_counter()
    model = loader.build_model(hf_config, backend, max_model_len, dtype, device, tp)
    not_fp8: set[int] = set()  # (an FP8 checkpoint's projections it keeps unquantized)
    if mc.load_format == "dummy":
        loader.fill_dummy_weights(model, mc.seed)
    else:
        not_fp8 = loader.load_weights(model, source.checkpoint_dir)
    logger.info("loaded %s (%s, %s) in %.1fs", mc.model, dtype, device, time.perf_counter() - t0)
    if fp8_weights:
        quantize_weights_fp8_(model, backend.ops, keep=not_fp8)
    lc = config.lora
    if lc.enable_lora:  # (before the CUDA graphs: they capture the slots' matmuls)
        attach_lora(model, lc.max_loras, lc.max_lora_rank)
    cuda_triton = device.type == "cuda" and backend.name == "triton"
    # A graph replays the collectives it captured: NCCL's can be, gloo's (host-side) cannot.
    graphed = cuda_triton and not mc.enforce_eager and (
        tp.size == 1 or dist.get_backend(tp.group) == "nccl")
    runner = ModelRunner(model, backend, config.scheduler, max_model_len, device, dtype, mc.seed,
                         GraphPlan(decode=graphed, mixed=graphed and mc.mixed_cuda_graphs), events,
                         tp)
    layout = KVLayout.of_model(hf_config, cc.tokens_per_block,
                               kv_cache_dtype(cc.kv_cache_dtype, dtype), tp.size)
    profile = ((lambda: runner.profile_kv_bytes(layout, cc.gpu_memory_utilization))
               if device.type == "cuda" else None)
    num_blocks = num_gpu_blocks(cc, layout, config.scheduler.max_num_seqs, max_model_len, profile)
    if agree is not None:
        num_blocks = agree(num_blocks)
    kv = KVMemory(cc, layout, num_blocks, device, max_model_len, copy_log,
                  ranks_on_host=local_world_size(tp.size))
    runner.bind_kv_cache(kv.cache)
    if cuda_triton:
        t0 = time.perf_counter()
        runner.warm_up_eager()
        logger.info("eager kernel variants warmed up in %.1f s", time.perf_counter() - t0)
    return RankParts(dtype, hf_config, source, max_model_len, runner, kv)


def _tokenizer_path(config: EngineConfig, source: loader.ModelSource) -> Any:
    if config.model.tokenizer is not None:
        return config.model.tokenizer
    if source.checkpoint_dir is not None:
        return source.checkpoint_dir
    # Shipped configs have no tokenizer of their own: cl100k_base, whose ids are the first 100k
    # of Llama 3's vocabulary.
    from fairswitch.model.cl100k import ensure_cl100k_tokenizer

    return ensure_cl100k_tokenizer()


def _max_model_len(hf_config: CheckpointConfig, wanted: int | None) -> int:
    limit, field = hf_config.max_position_embeddings, "max_position_embeddings"
    rope = hf_config.rope_scaling or {}
    if rope.get("rope_type") == "longrope" and rope["original_max_position_embeddings"] < limit:
        # Past it LongRoPE switches to its long factors for the whole sequence: not implemented.
        limit = rope["original_max_position_embeddings"]
        field = "original_max_position_embeddings: longrope's long factors are not implemented"
    if hf_config.sliding_window and hf_config.sliding_window < limit:
        # No sliding-window attention here: stay within the window, where it equals full.
        limit, field = hf_config.sliding_window, "sliding_window"
    if wanted is None:
        if field.startswith("original"):
            logger.warning("max_model_len is %d tokens (%s; the model's "
                           "max_position_embeddings: %d)", limit, field,
                           hf_config.max_position_embeddings)
        elif field == "sliding_window":
            logger.warning("the model attends through a sliding window of %d tokens, which "
                           "fairswitch does not implement: max_model_len is %d (its "
                           "max_position_embeddings: %d)", limit, limit,
                           hf_config.max_position_embeddings)
        return limit
    if wanted > limit:
        raise ValueError(f"max_model_len={wanted} exceeds the model's limit of {limit} tokens "
                         f"({field} in its config.json)")
    return wanted


def _eos_ids(hf_config: CheckpointConfig, tokenizer: Any,
             generation: GenerationConfig) -> set[int]:
    ids: set[int] = set()
    for value in (hf_config.eos_token_id, tokenizer.eos_token_id, generation.eos_token_id):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids
