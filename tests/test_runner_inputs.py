"""Step input layout, CUDA-graph buckets and backend selection (host side, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fairswitch.config import EngineConfig
from fairswitch.request import PLACEHOLDER_TOKEN, Request
from fairswitch.runner.attention import get_attention_backend
from fairswitch.runner.cuda_graph import batch_buckets
from fairswitch.runner.input_batch import build_input_batch
from fairswitch.scheduler.scheduler import SchedulerOutput
from fairswitch.sampling_params import SamplingParams


def _req(rid: str, n_prompt: int, n_computed: int, table: list[int], n_out: int = 0) -> Request:
    r = Request(rid, list(range(100, 100 + n_prompt)), SamplingParams(), 0.0)
    r.token_ids += list(range(500, 500 + n_out))
    r.num_computed_tokens = n_computed
    r.block_table = table
    return r


def test_input_batch_layout_decodes_first():
    bs = 4
    prefill = _req("p", 10, 4, [7, 3, 9])  # chunk of 6 tokens: positions 4..9, last chunk
    decode = _req("d", 5, 5, [2, 8], n_out=1)  # position 5 -> block 8, offset 1
    partial = _req("c", 12, 0, [1, 5])  # first chunk of 8 tokens: no sample yet
    b = build_input_batch(SchedulerOutput.planned([(prefill, 6), (decode, 1), (partial, 8)]), bs)
    assert b.num_decodes == 1
    assert b.input_ids.tolist() == [500] + list(range(104, 110)) + list(range(100, 108))
    assert b.positions.tolist() == [5] + list(range(4, 10)) + list(range(8))
    # slot = table[pos // 4] * 4 + pos % 4
    assert b.slot_mapping[0] == 8 * 4 + 1
    assert b.slot_mapping[1:7].tolist() == [3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4, 9 * 4 + 1]
    assert b.decode_seq_lens.tolist() == [6]
    assert b.prefill_query_start_loc.tolist() == [0, 6, 14]
    assert b.prefill_seq_lens.tolist() == [10, 8]
    assert b.prefill_block_tables.tolist() == [[7, 3, 9], [1, 5, 0]]
    assert b.sample_rows == [0, 6] and [r.request_id for r in b.sample_requests] == ["d", "p"]
    assert b.slot_mapping.dtype == np.int64 and b.decode_block_tables.dtype == np.int32


def test_placeholder_inputs_are_listed_to_feed():
    """A request's last token that is still a placeholder, as a decode's input or a prefill
    chunk's last, is listed with its row; a chunk that stops short of it is not."""
    ph = PLACEHOLDER_TOKEN
    decode = _req("d", 5, 5, [2, 8], n_out=1)
    decode.token_ids[-1] = ph
    plain = _req("e", 5, 5, [4, 6], n_out=1)
    restart = _req("r", 6, 0, [1, 5])
    restart.token_ids.append(ph)
    chunk = _req("c", 6, 0, [3, 7])
    chunk.token_ids.append(ph)
    planned = SchedulerOutput.planned([(plain, 1), (restart, 7), (decode, 1), (chunk, 4)])
    b = build_input_batch(planned, 4, ph)
    assert b.feed_rows == [1, 8] and [r.request_id for r in b.feed_requests] == ["d", "r"]
    assert b.input_ids[[1, 8]].tolist() == [ph, ph]
    # Without a placeholder value nothing is listed (the serial engine never has one).
    assert build_input_batch(SchedulerOutput.planned([(plain, 1)]), 4).feed_rows == []


def test_placeholder_inputs_need_the_step_that_samples_them():
    from fairswitch.engine.llm import LLM
    from fairswitch.runner.model_runner import PendingStep

    runner = LLM(num_gpu_blocks=64, max_model_len=256, device="cpu").engine.runner
    req = _req("d", 5, 5, [2, 8], n_out=1)
    req.token_ids[-1] = PLACEHOLDER_TOKEN
    batch = build_input_batch(SchedulerOutput.planned([(req, 1)]), 4, PLACEHOLDER_TOKEN)
    with pytest.raises(RuntimeError, match="no step in flight samples"):
        runner._feed_sources(batch, None)
    with pytest.raises(RuntimeError, match="no step in flight samples"):
        runner._feed_sources(batch, PendingStep([_req("x", 3, 3, [1])], torch.tensor([7])))
    other = _req("o", 3, 3, [1])
    src = runner._feed_sources(batch, PendingStep([other, req], torch.tensor([7, 42])))
    assert src == [1]
    feed = runner._feeder(batch.feed_rows, src, torch.tensor([7, 42]))
    ids = torch.from_numpy(batch.input_ids.copy())
    feed(ids)
    assert ids.tolist() == [42]
    batch.input_ids[0] = PLACEHOLDER_TOKEN  # a placeholder that is not a request's last token
    batch.feed_rows, batch.feed_requests = [], []
    with pytest.raises(RuntimeError, match="placeholders"):
        runner._feed_sources(batch, None)


def test_graph_buckets_cover_every_batch_size():
    for max_batch in (1, 7, 64, 100, 256):
        buckets = batch_buckets(max_batch)
        assert buckets[-1] == max_batch and buckets == sorted(set(buckets))
        assert all(any(b >= n for b in buckets) for n in range(1, max_batch + 1))


def test_backend_selection():
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig.from_kwargs(attention_backend="flash")


def test_bool_cli_flags():
    import argparse

    from fairswitch.config import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.from_cli_args(parser.parse_args([])).model.enforce_eager is False
    args = parser.parse_args(["--enforce-eager"])
    assert EngineConfig.from_cli_args(args).model.enforce_eager is True


def test_triton_backend_matches_torch_backend_on_a_mixed_step():
    """Both backends behind one interface, on a step of decodes + prefill chunks (the Triton one
    in the interpreter on CPU)."""
    from fairswitch.kv.kv_cache import KVCache, KVLayout
    from fairswitch.runner.attention import TorchAttentionBackend, TritonAttentionBackend
    from fairswitch.runner.model_runner import ModelRunner

    bs, hkv, hq, d = 8, 2, 4, 32
    reqs = [_req("d0", 11, 11, [3, 1], n_out=1), _req("d1", 17, 17, [0, 5, 2], n_out=1),
            _req("p0", 20, 3, [4, 6, 7]), _req("p1", 5, 0, [8])]
    sched = [(reqs[0], 1), (reqs[1], 1), (reqs[2], 17), (reqs[3], 5)]
    batch = build_input_batch(SchedulerOutput.planned(sched), bs)
    runner = ModelRunner.__new__(ModelRunner)
    runner.device = torch.device("cpu")
    meta = runner._metadata(batch)
    g = torch.Generator().manual_seed(0)
    q = torch.randn((batch.num_tokens, hq, d), generator=g)
    k = torch.randn((batch.num_tokens, hkv, d), generator=g)
    v = torch.randn((batch.num_tokens, hkv, d), generator=g)
    outs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        cache = KVCache(KVLayout(2, bs, hkv, d, torch.float32), 10, torch.device("cpu"))
        prefix = torch.Generator().manual_seed(1)
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=prefix))  # cached prefixes
        outs.append(backend.forward(q, k, v, cache.layer_views[1], meta))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_eager_warm_up_runs_every_case_and_changes_no_output():
    """The start-up warm-up of the eager kernel variants (Engine runs it on CUDA with Triton)
    writes only into the unowned block 0: generation afterwards is token for token the same."""
    from fairswitch import LLM

    prompts = ["warm up " * 9, "the cache stays clean"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def generate(warm: bool) -> list[list[int]]:
        llm = LLM(num_gpu_blocks=64, block_size=4, max_model_len=96)
        runner = llm.engine.runner
        if warm:
            runner.kv_cache.tensor.normal_()  # garbage everywhere, as uninitialized memory
            assert runner.warm_up_eager() == 5
        outs = llm.generate(prompts, params)
        llm.engine.check_accounting()
        return [o.outputs[0].token_ids for o in outs]

    assert generate(True) == generate(False)


def test_warm_up_batches_are_consistent_layouts():
    from fairswitch import LLM

    runner = LLM(num_gpu_blocks=16, block_size=4, max_model_len=32).engine.runner
    b = runner._warm_up_batch(2, 32, 7, 11)
    assert b.num_tokens == 9 and b.num_decodes == 2
    assert b.positions.tolist() == [31, 31, 4, 5, 6, 7, 8, 9, 10]
    assert b.slot_mapping.tolist() == [p % 4 for p in b.positions.tolist()]
    assert b.decode_block_tables.shape == (2, 8) and b.prefill_block_tables.shape == (1, 3)
    assert b.prefill_query_start_loc.tolist() == [0, 7] and b.prefill_seq_lens.tolist() == [11]
    clamped = runner._warm_up_batch(0, 0, 19, 16)  # a chunk never outgrows its context
    assert clamped.positions.tolist() == list(range(16))
    assert clamped.prefill_query_start_loc.tolist() == [0, 16]
    only = runner._warm_up_batch(3, 4, 0, 0)
    assert only.is_decode_only and only.prefill_query_start_loc.tolist() == [0]


def test_an_fp8_cache_on_a_gpu_without_triton_e4m3_takes_the_torch_reference(monkeypatch,
                                                                                 caplog):
    """Below compute capability 8.9 (A100, V100) Triton has no e4m3: the engine built, then the
    first forward failed with a Triton compile error."""
    cuda = torch.device("cuda")
    capability = (8, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.raises(ValueError, match="compute capability 8.9 or newer .* this GPU has 8.0: "
                                         "pass --attention-backend torch"):
        get_attention_backend("triton", cuda, "fp8")
    with caplog.at_level("WARNING", logger="fairswitch.runner.attention"):
        assert get_attention_backend("auto", cuda, "fp8").name == "torch"
    assert "runs on the torch reference" in caplog.text
    assert get_attention_backend("auto", cuda, "auto").name == "triton"  # bf16: any GPU
    capability = (9, 0)
    assert get_attention_backend("auto", cuda, "fp8").name == "triton"
