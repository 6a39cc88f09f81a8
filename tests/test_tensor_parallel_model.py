"""Tensor-parallel model (CPU, gloo): N ranks' logits equal one rank's, from a checkpoint and from
dummy weights; the head and size checks; at one rank the plain model, with no collective.

The ranks are spawned processes (2 and 4) that each run every case and save their logits; the
parent compares them with the single-process model's. Shapes are tiny: 8 query heads, 4 or 2 KV
heads (divided, and replicated at 4 ranks), a vocabulary of 1003 (padded at 2 and 4 ranks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from fairswitch.distributed.parallel_state import SINGLE, TPGroup, local_kv_heads
from fairswitch.distributed.workers import free_port
from fairswitch.kv.kv_cache import KVCache, KVLayout
from fairswitch.model import loader
from fairswitch.model.checkpoint_config import CheckpointConfig
from fairswitch.model.llama import RowParallelLinear
from fairswitch.runner.attention import AttentionMetadata, get_attention_backend

CPU = torch.device("cpu")
BLOCK_SIZE = 4
VOCAB = 1003  # prime: padded at every TP size
# Two requests over three steps, as (request, first position, tokens) in step order: both
# prompts' first chunks; A's first decode with B's second chunk (over its cached prefix); both
# decoding. Ids straddle the vocabulary slices' edges (251, 502, 753) and reach the last id.
TABLES = {"a": [0, 1], "b": [2, 3]}
STEPS = [
    [("a", 0, [0, 250, 251, 1002, 753]), ("b", 0, [501, 502, 752, 7])],
    [("a", 5, [1001]), ("b", 4, [999, 3, 251])],
    [("a", 6, [12]), ("b", 7, [1000])],
]


def _step_inputs(step: list[tuple[str, int, list[int]]]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step's ids, positions and metadata, decodes (one token) first as the runner lays them."""
    step = sorted(step, key=lambda s: len(s[2]) != 1)
    decodes = [s for s in step if len(s[2]) == 1]
    prefills = [s for s in step if len(s[2]) > 1]
    ids, positions, slots = [], [], []
    for req, start, tokens in step:
        for pos in range(start, start + len(tokens)):
            positions.append(pos)
            slots.append(TABLES[req][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        ids += tokens
    starts = [0]
    for _, _, tokens in prefills:
        starts.append(starts[-1] + len(tokens))
    i32 = dict(dtype=torch.int32)
    width = len(TABLES["a"])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decodes=len(decodes),
        decode_block_tables=torch.tensor([TABLES[r] for r, _, _ in decodes], **i32).view(-1, width),
        decode_seq_lens=torch.tensor([p + 1 for _, p, _ in decodes], **i32),
        prefill_block_tables=torch.tensor([TABLES[r] for r, _, _ in prefills],
                                          **i32).view(-1, width),
        prefill_query_start_loc=torch.tensor(starts, **i32),
        prefill_seq_lens=torch.tensor([p + len(t) for _, p, t in prefills], **i32),
        prefill_query_start_loc_host=starts,
        prefill_seq_lens_host=[p + len(t) for _, p, t in prefills],
        max_query_len=max((len(t) for _, _, t in prefills), default=0))
    return torch.tensor(ids), torch.tensor(positions), meta


def _logits(ckpt: Path, seed: int | None, tp: TPGroup) -> torch.Tensor:
    """Every step's logits (all tokens), of the checkpoint's weights or dummy ones (``seed``)."""
    cfg = CheckpointConfig.from_file(ckpt / "config.json")
    model = loader.build_model(cfg, get_attention_backend("torch", CPU), 64, torch.float32, CPU,
                               tp)
    if seed is None:
        loader.load_weights(model, ckpt)
    else:
        loader.fill_dummy_weights(model, seed)
    kv_heads = local_kv_heads(cfg, tp.size)
    assert model.layers[0].self_attn.num_kv_heads == kv_heads
    cache = KVCache(KVLayout(cfg.num_hidden_layers, BLOCK_SIZE, kv_heads, cfg.head_dim,
                             torch.float32), 4, CPU)
    out = []
    with torch.inference_mode():
        for step in STEPS:
            ids, positions, meta = _step_inputs(step)
            hidden = model(ids, positions, cache.layer_views, meta)
            out.append(model.compute_logits(hidden))
    return torch.cat(out)


CASES = [(name, seed) for name in ("llama", "qwen2") for seed in (None, 5)] + [("qwen3", None)]


def _rank_main(rank: int, world: int, port: int, dirs: dict[str, Path], out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tp = TPGroup.world()
        assert (tp.rank, tp.size) == (rank, world)
        results = {(name, seed): _logits(dirs[name], seed, tp) for name, seed in CASES}
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _randomize_biases(ckpt: Path) -> None:
    """HF initializes biases to zero and norms to one; random ones show the o_proj bias is added
    once, and each rank's heads take the whole q/k norm."""
    from safetensors.torch import load_file, save_file

    (file,) = ckpt.glob("*.safetensors")
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(9)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            tensors[name] = 1 + torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, write_checkpoint) -> dict[str, Path]:
    shape = dict(hidden_size=64, num_attention_heads=8, intermediate_size=96, vocab_size=VOCAB,
                 num_hidden_layers=2)
    root = tmp_path_factory.mktemp("tp")
    # q/k/v and o_proj biases, separate LM head, 4 KV heads (divided at 2 and 4 ranks).
    llama = write_checkpoint(root / "llama", "llama", num_key_value_heads=4,
                             attention_bias=True, tie_word_embeddings=False, **shape)
    # q/k/v biases, tied embeddings, 2 KV heads (replicated at 4 ranks).
    qwen = write_checkpoint(root / "qwen2", "qwen2", num_key_value_heads=2,
                            tie_word_embeddings=True, **shape)
    # q/k norms, heads of 16 (not 64 // 8), 2 KV heads.
    qwen3 = write_checkpoint(root / "qwen3", "qwen3", num_key_value_heads=2, head_dim=16,
                             **shape)
    for ckpt in (llama, qwen, qwen3):
        _randomize_biases(ckpt)
    return {"llama": llama, "qwen2": qwen, "qwen3": qwen3}


@pytest.fixture(scope="module")
def single(dirs) -> dict:
    torch.manual_seed(0)
    return {(name, seed): _logits(dirs[name], seed, SINGLE) for name, seed in CASES}


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_logits_equal_single_rank(world, dirs, single, tmp_path):
    mp.spawn(_rank_main, args=(world, free_port(), dirs, tmp_path), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case, want in single.items():
        got = ranks[0][case]
        assert got.shape == (sum(len(t) for step in STEPS for _, _, t in step), VOCAB)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{case}: {m}")
        for r in range(1, world):  # every rank ends with the same logits
            torch.testing.assert_close(ranks[r][case], got, atol=0, rtol=0)
    # The dummy weights are slices of TP=1's: different seeds still differ.
    assert not torch.allclose(single[("llama", 5)], single[("llama", None)])


def test_local_kv_heads_divided_and_replicated(dirs):
    llama = CheckpointConfig.from_file(dirs["llama"] / "config.json")  # 8 heads, 4 KV heads
    qwen = CheckpointConfig.from_file(dirs["qwen2"] / "config.json")  # 8 heads, 2 KV heads
    assert [local_kv_heads(llama, n) for n in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert [local_kv_heads(qwen, n) for n in (1, 2, 4, 8)] == [2, 1, 1, 1]
    # Replicated: rank r holds KV head r * 2 // 4, the one its two query heads use.
    model = loader.build_model(qwen, get_attention_backend("torch", CPU), 64, torch.float32,
                               torch.device("meta"), TPGroup(3, 4, group=object()))
    attn = model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    d = qwen.head_dim
    assert attn.qkv_proj.shard.pieces == ((6 * d, 2 * d), ((8 + 1) * d, d), ((8 + 2 + 1) * d, d))


@pytest.mark.parametrize("overrides, size, message", [
    (dict(num_attention_heads=12, num_key_value_heads=4), 5,
     "num_attention_heads=12 is not divisible by tensor_parallel_size=5"),
    (dict(num_attention_heads=12, num_key_value_heads=4), 3,
     "num_key_value_heads=4 is not divisible by tensor_parallel_size=3"),
    (dict(num_attention_heads=12, num_key_value_heads=4), 6,
     "tensor_parallel_size=6 is larger than num_key_value_heads=4 but not a multiple"),
    (dict(intermediate_size=90), 4, "intermediate_size=90 is not divisible by "
     "tensor_parallel_size=4"),
])
def test_sizes_that_do_not_split_are_refused(dirs, overrides, size, message):
    raw = dict(CheckpointConfig.from_file(dirs["llama"] / "config.json").raw, **overrides)
    cfg = CheckpointConfig.from_dict(raw)
    with pytest.raises(ValueError, match=message):
        local_kv_heads(cfg, size)
    with pytest.raises(ValueError, match=message):  # before any weight is allocated
        loader.build_model(cfg, get_attention_backend("torch", CPU), 64, torch.float32,
                           torch.device("meta"), TPGroup(0, size, group=object()))


class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_single_rank_model_is_the_plain_model(dirs, monkeypatch):
    """TP=1: full shapes, plain layers, and its forward runs no collective and no masking."""
    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran at tensor-parallel size 1")

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, refuse)
    cfg = CheckpointConfig.from_file(dirs["llama"] / "config.json")
    model = loader.build_model(cfg, get_attention_backend("torch", CPU), 64, torch.float32, CPU)
    loader.load_weights(model, dirs["llama"])
    assert not any(isinstance(m, RowParallelLinear) for m in model.modules())
    d, hidden = cfg.head_dim, cfg.hidden_size
    shapes = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
    assert shapes["embed_tokens"] == shapes["lm_head.weight"] == (VOCAB, hidden)
    assert shapes["layers.0.self_attn.qkv_proj.weight"] == ((8 + 2 * 4) * d, hidden)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (hidden, 8 * d)
    assert shapes["layers.0.mlp.gate_up_proj.weight"] == (2 * 96, hidden)
    assert shapes["layers.0.mlp.down_proj.weight"] == (hidden, 96)
    cache = KVCache(KVLayout(2, BLOCK_SIZE, 4, d, torch.float32), 4, CPU)
    ids, positions, meta = _step_inputs(STEPS[0])
    with torch.inference_mode(), _AtenOps() as ops:
        model.compute_logits(model(ids, positions, cache.layer_views, meta))
    assert not {n for n in ops.names if "mask" in n or n in ("lt", "ge", "bitwise_or")}, ops.names
