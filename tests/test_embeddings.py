"""Embeddings (``LLM.embed``, vLLM's): the last prompt token's state after the final norm, as
transformers' model computes it, whatever the batch, the chunking or the prefix cache does."""

from __future__ import annotations

import pytest
import torch

from fairswitch import LLM, PoolingParams, SamplingParams

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog " * 3, "Hi"]


def _hf_states(model_dir, ids: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([t])).last_hidden_state[0, -1] for t in ids]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_embeddings_are_transformers_last_token_states(arch, llama_dir, qwen3_dir):
    model_dir = llama_dir if arch == "llama" else qwen3_dir
    # Chunks of 7 tokens, and 4-token blocks: the long prompt ends in a later step than it
    # starts, and its prefix is cached for the second pass.
    llm = LLM(model=str(model_dir), num_gpu_blocks=128, max_model_len=256,
              max_num_batched_tokens=7, block_size=4)
    outs = llm.embed(TEXTS, use_tqdm=False)
    want = _hf_states(model_dir, [o.prompt_token_ids for o in outs])
    for out, state in zip(outs, want):
        got = torch.tensor(out.outputs.embedding)
        torch.testing.assert_close(got, torch.nn.functional.normalize(state, dim=0),
                                   atol=1e-5, rtol=1e-4)
    again = llm.embed(TEXTS[1], use_tqdm=False)[0]  # (its prefix from the cache)
    assert llm.engine.scheduler.num_reused_tokens > 0
    torch.testing.assert_close(torch.tensor(again.outputs.embedding),
                               torch.tensor(outs[1].outputs.embedding), atol=1e-5, rtol=1e-4)
    raw = llm.embed(TEXTS[0], PoolingParams(normalize=False, dimensions=16), use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(raw.outputs.embedding), want[0][:16],
                               atol=1e-5, rtol=1e-4)


def test_embedding_requests_run_beside_generation_and_are_checked():
    llm = LLM(num_gpu_blocks=64, max_model_len=64)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = llm.generate(["Tell me"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    embedded = llm.embed(["Hello"], use_tqdm=False)[0].outputs.embedding
    engine.add_request("Tell me", greedy, request_id="g")
    engine.add_request("Hello", request_id="e", pooling=PoolingParams())
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["g"].outputs[0].token_ids == alone and done["g"].embedding is None
    torch.testing.assert_close(torch.tensor(done["e"].embedding), torch.tensor(embedded))
    assert done["e"].outputs[0].text == ""  # (its one token is nobody's)
    long = "word " * 100
    cut = llm.embed(long, truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert len(cut.prompt_token_ids) == 10
    with pytest.raises(ValueError, match="dimensions must be at most the model's hidden size"):
        llm.embed("Hi", PoolingParams(dimensions=10_000), use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions must be a positive integer"):
        PoolingParams(dimensions=0)
    with pytest.raises(TypeError, match="pooling must be PoolingParams"):
        engine.add_request("Hi", pooling={"normalize": True})
    with pytest.raises(TypeError, match="pooling_params must be a PoolingParams"):
        llm.embed("Hi", {}, use_tqdm=False)  # (was taken as the defaults)
    assert not engine.requests


def test_the_embeddings_route_answers_the_openai_client():
    """/v1/embeddings through the real openai client (which asks for base64 and decodes it),
    the same vectors as LLM.embed; inputs as text or token ids; errors name their field."""
    import numpy as np
    import openai

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=256,
                                                              max_model_len=256, max_waiting=4))
    try:
        with BackgroundServer(build_app(engine, ServerSettings(), shutdown_engine=False)) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
            got = client.embeddings.create(model="fairswitch-tiny", input=TEXTS)
            tokens = engine.engine.tokenizer.encode(TEXTS[0])
            by_ids = client.embeddings.create(model="fairswitch-tiny", input=[tokens],
                                              encoding_format="float", dimensions=8,
                                              extra_body={"normalize": False})
            errors = {}
            for fields, param in (({"input": []}, "input"), ({"input": ""}, "input"),
                                  ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
                                  ({"input": "x", "dimensions": 100_000}, "dimensions"),
                                  ({"input": ["x"] * 5}, "input"),  # (more than the queue holds)
                                  ({"input": [[10 ** 9]]}, "input")):
                with pytest.raises(openai.BadRequestError) as e:
                    client.embeddings.create(model="fairswitch-tiny", **fields)
                errors[str(fields)] = (param, e.value.body)
            with pytest.raises(openai.NotFoundError):
                client.embeddings.create(model="other", input="x")
    finally:
        engine.shutdown()
    llm = LLM(num_gpu_blocks=256, max_model_len=256)
    want = [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "fairswitch-tiny"
    for d, w in zip(got.data, want):
        np.testing.assert_allclose(d.embedding, w, atol=1e-5)
    assert got.usage.prompt_tokens == sum(len(llm.get_tokenizer().encode(t)) for t in TEXTS)
    raw = llm.embed([tokens], PoolingParams(normalize=False, dimensions=8), use_tqdm=False)[0]
    np.testing.assert_allclose(by_ids.data[0].embedding, raw.outputs.embedding, atol=1e-5)
    for param, body in errors.values():
        assert body["param"] == param, body
    assert "5 inputs need 5 places in the waiting queue" in str(errors[str({"input": ["x"] * 5})])


def test_score_and_rerank_by_the_embeddings_cosine_similarity():
    """vLLM's /score (one text_1 against each text_2, or pairwise) and /rerank (Jina's,
    Cohere's: best first, top_n) for embedding models: the cosine similarity of LLM.embed's
    vectors; malformed bodies are 400s naming the field."""
    import asyncio

    import aiohttp
    import numpy as np

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    query, docs = "capital of France", ["Bananas are yellow", "Paris", "France is big"]
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=256,
                                                              max_model_len=256, max_waiting=4))

    async def ask(url: str, calls: list[tuple[str, dict]]) -> list[tuple[int, dict]]:
        out = []
        async with aiohttp.ClientSession() as s:
            for path, body in calls:
                async with s.post(url + path, json=body) as r:
                    out.append((r.status, await r.json()))
        return out

    bad = [("/score", {"text_1": ["a", "b"], "text_2": ["c"]}, "text_1"),
           ("/score", {"text_1": "a"}, "text_2"),
           ("/rerank", {"query": ["a"], "documents": docs}, "query"),
           ("/rerank", {"query": "a", "documents": []}, "documents"),
           ("/rerank", {"query": "a", "documents": docs, "top_n": -1}, "top_n"),
           ("/rerank", {"query": "a", "documents": ["d"] * 4}, "documents")]  # (5 > 4 places)
    try:
        with BackgroundServer(build_app(engine, ServerSettings(), shutdown_engine=False)) as srv:
            replies = asyncio.run(ask(srv.url, [
                ("/score", {"text_1": query, "text_2": docs}),
                ("/v1/score", {"text_1": [query, docs[0]], "text_2": [docs[1], docs[2]]}),
                ("/v1/rerank", {"query": query, "documents": [docs[0], {"text": docs[1]},
                                                              docs[2]], "top_n": 2}),
                *[(path, body) for path, body, _ in bad]]))
    finally:
        engine.shutdown()
    vec = {t: np.array(o.outputs.embedding) for t, o in zip(
        [query, *docs], LLM(num_gpu_blocks=256, max_model_len=256).embed(
            [query, *docs], use_tqdm=False))}
    (s1, one), (s2, pairwise), (s3, reranked) = replies[:3]
    assert (s1, s2, s3) == (200, 200, 200)
    np.testing.assert_allclose([d["score"] for d in one["data"]],
                               [vec[query] @ vec[d] for d in docs], atol=1e-5)
    np.testing.assert_allclose([d["score"] for d in pairwise["data"]],
                               [vec[query] @ vec[docs[1]], vec[docs[0]] @ vec[docs[2]]],
                               atol=1e-5)
    order = sorted(range(3), key=lambda i: -(vec[query] @ vec[docs[i]]))[:2]
    assert [r["index"] for r in reranked["results"]] == order
    assert [r["document"]["text"] for r in reranked["results"]] == [docs[i] for i in order]
    for (status, body), (_, _, param) in zip(replies[3:], bad):
        assert status == 400 and body["error"]["param"] == param, body


def test_llm_score_is_the_embeddings_cosine_similarity():
    import numpy as np

    llm = LLM(num_gpu_blocks=256, max_model_len=256)
    texts = ["capital of France", "Paris", "Bananas"]
    vec = [np.array(o.outputs.embedding) for o in llm.embed(texts, use_tqdm=False)]
    one = llm.score(texts[0], texts[1:], use_tqdm=False)
    np.testing.assert_allclose([o.outputs.score for o in one],
                               [vec[0] @ vec[1], vec[0] @ vec[2]], atol=1e-5)
    pairwise = llm.score(texts[:2], texts[1:], use_tqdm=False)
    np.testing.assert_allclose([o.outputs.score for o in pairwise],
                               [vec[0] @ vec[1], vec[1] @ vec[2]], atol=1e-5)
    with pytest.raises(ValueError, match="give one data_1, or as many as data_2"):
        llm.score(texts, texts[:2], use_tqdm=False)
