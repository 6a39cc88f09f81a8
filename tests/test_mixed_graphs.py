"""Graphs for steps with prompt tokens (runner/mixed_graphs.py): buckets, the padded layout that
sends every sequence through the prefill kernel, the kernel on that layout (interpreted on CPU),
and, on a GPU, the same tokens with and without the graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairswitch.runner.input_batch import InputBatch
from fairswitch.runner.mixed_graphs import (fill_mixed_layout, mixed_layout, seq_buckets,
                                            token_buckets)

from test_kernels import (DEVICE, assert_close, compact_fp32, fill_blocks, make_cache,  # noqa: F401
                          pa, random_block_tables, ref)


def test_buckets():
    assert token_buckets(2048) == [64, 128, 192, 256, 320, 384, 448, 512]
    assert token_buckets(512) == token_buckets(2048) and token_buckets(300)[-2:] == [256, 300]
    assert token_buckets(100) == [64, 100] and token_buckets(8) == [8]
    assert seq_buckets(64) == [4, 16, 64] and seq_buckets(4) == [4] and seq_buckets(2) == [2]
    with pytest.raises(ValueError):
        token_buckets(0)


def mixed_batch(decode_lens: list[int], chunks: list[tuple[int, int]], tables: np.ndarray
                ) -> InputBatch:
    """A step of decodes (sequence lengths after the step) then prefill chunks (query length,
    sequence length after the step); ``tables`` one row per sequence in that order."""
    nd = len(decode_lens)
    q_lens = [1] * nd + [q for q, _ in chunks]
    pos = np.concatenate([np.arange(s - q, s) for q, s in
                          zip(q_lens, decode_lens + [s for _, s in chunks])]).astype(np.int64)
    n = len(pos)
    return InputBatch(
        input_ids=np.arange(1, n + 1, dtype=np.int64), positions=pos,
        slot_mapping=np.arange(100, 100 + n, dtype=np.int64), num_decodes=nd,
        decode_block_tables=tables[:nd], decode_seq_lens=np.array(decode_lens, dtype=np.int32),
        prefill_block_tables=tables[nd:],
        prefill_query_start_loc=np.concatenate([[0], np.cumsum([q for q, _ in chunks])]
                                               ).astype(np.int32),
        prefill_seq_lens=np.array([s for _, s in chunks], dtype=np.int32),
        sample_rows=[], sample_requests=[])


def test_layout_pads_tokens_and_sequences_and_keeps_the_token_order():
    tables = np.arange(4 * 3, dtype=np.int32).reshape(4, 3) + 1
    batch = mixed_batch([5, 9], [(3, 3), (4, 20)], tables)  # 2 + 3 + 4 = 9 tokens
    lay = mixed_layout(batch, num_tokens=16, num_seqs=6, width=5)
    assert list(lay.input_ids[:9]) == list(batch.input_ids) and not lay.input_ids[9:].any()
    assert list(lay.positions[:9]) == [4, 8, 0, 1, 2, 16, 17, 18, 19]
    assert list(lay.slot_mapping[9:]) == [-1] * 7 and list(lay.slot_mapping[:9]) == list(
        range(100, 109))
    assert list(lay.query_start_loc) == [0, 1, 2, 5, 9, 9, 9]  # padding sequences: q_len 0
    assert list(lay.seq_lens) == [5, 9, 3, 20, 0, 0]
    assert (lay.block_tables[:4, :3] == tables).all() and not lay.block_tables[4:].any()
    assert not lay.block_tables[:, 3:].any()
    with pytest.raises(ValueError, match="does not fit"):
        mixed_layout(batch, num_tokens=8, num_seqs=6, width=5)
    with pytest.raises(ValueError, match="does not fit"):
        mixed_layout(batch, num_tokens=16, num_seqs=3, width=5)
    with pytest.raises(ValueError, match="exceed width"):
        mixed_layout(batch, num_tokens=16, num_seqs=6, width=2)


def test_refilling_the_staging_layout_leaves_nothing_of_the_previous_step_that_is_read():
    """The graphs refill one staging buffer each step: after a large step, a smaller one in a
    smaller bucket reads only its own values (entries past its bucket are not read)."""
    tables = np.arange(6 * 4, dtype=np.int32).reshape(6, 4) + 1
    big = mixed_batch([5, 9, 3], [(6, 6), (4, 20), (2, 30)], tables)  # 15 tokens, 6 sequences
    small = mixed_batch([7], [(3, 11)], tables[:2, :2] + 100)  # 4 tokens, 2 sequences
    dst = mixed_layout(big, num_tokens=16, num_seqs=8, width=4)
    assert fill_mixed_layout(small, 8, 4, dst) == 2
    fresh = mixed_layout(small, num_tokens=8, num_seqs=4, width=4)
    for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
        assert list(getattr(dst, name)[:len(getattr(fresh, name))]) == list(
            getattr(fresh, name)), name
    assert list(dst.query_start_loc[:5]) == list(fresh.query_start_loc) == [0, 1, 4, 4, 4]
    assert (dst.block_tables[:2, :2] == tables[:2, :2] + 100).all()


def test_prefill_kernel_on_the_padded_layout_matches_the_reference():
    """Decodes and chunks in one launch of the prefill kernel, padded to a bucket: the real rows
    equal the reference (decodes as single-token chunks)."""
    torch.manual_seed(21)
    block_size, head_dim, group, num_kv_heads = 16, 64, 4, 2
    decode_lens, chunks = [1, 37, 70], [(20, 20), (9, 58)]
    lens = decode_lens + [s for _, s in chunks]
    max_blocks = -(-max(lens) // block_size)
    num_blocks = len(lens) * max_blocks + 4
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim)
    tables_t = random_block_tables(len(lens), max_blocks, num_blocks)
    fill_blocks(pool, tables_t)
    batch = mixed_batch(decode_lens, chunks, tables_t.cpu().numpy())
    n, T, S = batch.num_tokens, 64, 8
    lay = mixed_layout(batch, T, S, width=max_blocks + 2)
    q = torch.randn(T, num_kv_heads * group, head_dim, device=DEVICE)
    out = pa.paged_prefill_attention(
        q, k_cache, v_cache, torch.from_numpy(lay.block_tables).to(DEVICE),
        torch.from_numpy(lay.query_start_loc).to(DEVICE),
        torch.from_numpy(lay.seq_lens).to(DEVICE), max_query_len=None)
    kf, vf, bt = compact_fp32(k_cache, v_cache, tables_t)
    starts = [int(x) for x in lay.query_start_loc[:len(lens) + 1]]
    expected = ref.paged_prefill_attention(q[:n], kf, vf, bt, starts, lens)
    assert_close(out[:n], expected, torch.float32)


@pytest.mark.gpu
def test_mixed_graphs_give_the_eager_tokens(tmp_path):
    """Greedy outputs of a batch whose steps mix prefills and decodes: identical with the
    prefill/mixed graphs and without them (fp32, so no rounding differences). Without them the
    steps also run in turn; with them each is launched behind the one in flight (async
    scheduling: graph inputs read from its tokens on the device)."""
    from fairswitch import LLM, SamplingParams

    prompts = [f"question {i}: " + "word " * (5 + 37 * i) for i in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for mixed in (False, True):
        llm = LLM(model="fairswitch-tiny", dtype="float32", max_num_seqs=8,
                  max_num_batched_tokens=256, mixed_cuda_graphs=mixed, max_model_len=512,
                  async_scheduling=mixed)
        assert (llm.engine.runner.mixed_graphs is not None) == mixed
        outs[mixed] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]


def test_model_on_the_padded_layout_gives_the_eager_hidden_states():
    """The whole model (tiny, CPU, torch attention) on a real mixed step laid out for a graph
    bucket: the real rows equal the normal eager step's (padding rows stay in their rows)."""
    from fairswitch import LLM, SamplingParams
    from fairswitch.runner.attention import AttentionMetadata
    from fairswitch.runner.input_batch import build_input_batch

    # Steps in turn: the step scheduled below by hand has no step in flight to read tokens from.
    llm = LLM(num_gpu_blocks=64, block_size=8, max_model_len=256, max_num_batched_tokens=64,
              async_scheduling=False)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request("a short one", params)
    engine.step()
    engine.step()  # now decoding
    engine.add_request("a longer prompt that will be chunked " * 6, params)
    engine.add_request("and a third", params)
    sched = engine.scheduler.schedule()
    batch = build_input_batch(sched, engine.kv.block_size)
    assert 0 < batch.num_decodes < batch.num_tokens  # decodes and prompt tokens together
    runner = engine.runner
    with torch.inference_mode():
        ids, pos = runner._to_device(batch.input_ids), runner._to_device(batch.positions)
        eager = runner.model(ids, pos, runner.kv_cache.layer_views, runner._metadata(batch))
        T, S, width = 128, 8, 256 // 8
        lay = mixed_layout(batch, T, S, width)
        empty = torch.zeros(0, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(lay.slot_mapping), num_decodes=0,
            decode_block_tables=empty.view(0, 1), decode_seq_lens=empty,
            prefill_block_tables=torch.from_numpy(lay.block_tables),
            prefill_query_start_loc=torch.from_numpy(lay.query_start_loc),
            prefill_seq_lens=torch.from_numpy(lay.seq_lens),
            prefill_query_start_loc_host=lay.query_start_loc.tolist(),
            prefill_seq_lens_host=lay.seq_lens.tolist(), max_query_len=None)
        padded = runner.model(torch.from_numpy(lay.input_ids), torch.from_numpy(lay.positions),
                              runner.kv_cache.layer_views, meta)
    n = batch.num_tokens
    torch.testing.assert_close(padded[:n], eager, atol=1e-4, rtol=1e-4)
