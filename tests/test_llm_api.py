"""The offline API reaches the scheduler: per-prompt priorities and client ids."""

from __future__ import annotations

import pytest

from fairswitch import LLM, SamplingParams

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def _finish_order(outs) -> list[int]:
    return sorted(range(len(outs)), key=lambda i: outs[i].metrics.finished_time)


def test_priorities_per_prompt_decide_who_runs_first():
    # One request at a time: the order they finish in is the order the scheduler ranked them.
    llm = LLM(num_gpu_blocks=64, max_model_len=64, max_num_seqs=1, policy="priority")
    prompts = ["first queued", "second queued", "third queued"]
    outs = llm.generate(prompts, PARAMS, use_tqdm=False, priority=[2, 0, 1])
    assert _finish_order(outs) == [1, 2, 0]
    assert [o.prompt for o in outs] == prompts  # results stay in prompt order
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)  # default: one priority, FCFS order
    assert _finish_order(outs) == [0, 1, 2]


def test_client_ids_reach_the_fairness_policy():
    # VTC serves the client with the least service first: client b, whose three requests
    # queued behind a's, takes turns with a (FCFS would serve a's three first).
    llm = LLM(num_gpu_blocks=64, max_model_len=64, max_num_seqs=1, policy="vtc")
    prompts = ["a one", "a two", "a three", "b one", "b two", "b three"]
    outs = llm.generate(prompts, PARAMS, use_tqdm=False, client_id=["a"] * 3 + ["b"] * 3)
    assert _finish_order(outs) == [0, 3, 1, 4, 2, 5]
    counters = llm.engine.scheduler.ranking.counters
    assert set(counters) == {"a", "b"} and min(counters.values()) > 0


def test_client_weights_take_a_dict():
    """``LLM(client_weights={"a": 2})`` was refused: only the CLI's "a=2" string was taken."""
    llm = LLM(num_gpu_blocks=64, max_model_len=64, max_num_seqs=1, policy="vtc",
              client_weights={"a": 2, "b": 1.0})
    assert llm.engine.scheduler.ranking.weights == {"a": 2.0, "b": 1.0}
    with pytest.raises(ValueError, match="client weight of 'b' must be a finite number > 0"):
        LLM(num_gpu_blocks=64, max_model_len=64, policy="vtc", client_weights={"a": 2, "b": -1})


@pytest.mark.parametrize("kwargs, match", [
    ({"priority": [0, 1]}, "3 prompts but 2 values of priority"),
    ({"priority": 1.5}, "priority has invalid values"),
    ({"priority": True}, "priority has invalid values"),
    ({"priority": 2**63}, "priority has invalid values"),
    ({"client_id": ["a", 7, "c"]}, "client_id has invalid values"),
])
def test_bad_priorities_and_client_ids_queue_nothing(kwargs, match):
    llm = LLM(num_gpu_blocks=64, max_model_len=64)
    with pytest.raises(ValueError, match=match):
        llm.generate(["x", "y", "z"], PARAMS, use_tqdm=False, **kwargs)
    assert not llm.engine.has_unfinished_requests()


def test_more_prompts_than_the_queue_holds_join_as_it_frees():
    """Offline, max_waiting caps the queue, not the batch: the rest join as it frees (this
    raised QueueFullError), in prompt order, n > 1 copies included."""
    prompts = [f"prompt {i}" for i in range(7)]
    params = SamplingParams(max_tokens=4, n=2, temperature=0.0, ignore_eos=True)
    capped = LLM(num_gpu_blocks=64, max_model_len=64, max_waiting=2, max_num_seqs=2)
    outs = capped.generate(prompts, params, use_tqdm=False)
    free = LLM(num_gpu_blocks=64, max_model_len=64).generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [[c.token_ids for c in o.outputs] for o in outs] == \
        [[c.token_ids for c in o.outputs] for o in free]
    assert not capped.engine.has_unfinished_requests() and not capped.engine.requests


def test_n_choices_are_admitted_together():
    """The server's n choices: the first needs n places in the queue, held for the others until
    they join (they take a held place) or the response ends, so a full queue refuses a request
    before any choice has begun, and never holds more than max_waiting."""
    from fairswitch.scheduler.scheduler import QueueFullError

    engine = LLM(num_gpu_blocks=64, max_model_len=64, max_waiting=3).engine
    with pytest.raises(ValueError, match="4 choices of one request need 4 places .* holds 3"):
        engine.add_request("a", PARAMS, queue_places=4)
    engine.add_request("a", PARAMS, request_id="a")
    with pytest.raises(QueueFullError):
        engine.add_request("b", PARAMS, queue_places=3)  # 2 places left
    engine.add_request("b", PARAMS, request_id="b", queue_places=2)
    with pytest.raises(QueueFullError):  # the third place is b's second choice's
        engine.add_request("c", PARAMS)
    engine.add_request("b", PARAMS, request_id="b-1", held_by="b")
    with pytest.raises(QueueFullError):
        engine.add_request("c", PARAMS)
    assert sorted(engine.requests) == ["a", "b", "b-1"] and len(engine.scheduler.waiting) == 3
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.requests
    # A response that ends before its choices join gives their places back.
    engine.add_request("d", PARAMS, request_id="d", queue_places=3)
    with pytest.raises(QueueFullError):
        engine.add_request("e", PARAMS)
    engine.abort_request("d")
    engine.release_places("d")
    # A group's member whose first was refused, or whose places are given back, takes none of
    # its own (a batch's second prompt was admitted on the last free place when its first was
    # refused for a full queue).
    with pytest.raises(QueueFullError, match="no place is held for 'd'"):
        engine.add_request("d", PARAMS, request_id="d-1", held_by="d")
    for rid in "efg":
        engine.add_request("e", PARAMS, request_id=rid)


def test_places_reserved_for_a_caller_are_kept_for_its_whole_life():
    """A beam search's steps come one after another: its reserve_places hold keeps a place for
    each of its requests from start to end, taken while one waits, free for it again once it
    has left the queue, and nobody else's meanwhile."""
    from fairswitch.scheduler.scheduler import QueueFullError

    engine = LLM(num_gpu_blocks=64, max_model_len=64, max_waiting=3).engine
    with pytest.raises(ValueError, match="4 requests at a time need 4 places .* holds 3"):
        engine.reserve_places("s", 4)
    engine.add_request("a", PARAMS, request_id="a")
    with pytest.raises(QueueFullError):
        engine.reserve_places("s", 3)
    engine.reserve_places("s", 2)
    with pytest.raises(ValueError, match="already held"):
        engine.reserve_places("s", 1)
    with pytest.raises(QueueFullError):  # a's place and s's two
        engine.add_request("b", PARAMS)
    engine.add_request("x", PARAMS, request_id="s-0", held_by="s")
    engine.add_request("x", PARAMS, request_id="s-1", held_by="s")
    with pytest.raises(QueueFullError, match="the 2 places reserved for 's' are all taken"):
        engine.add_request("x", PARAMS, request_id="s-2", held_by="s")
    with pytest.raises(QueueFullError):
        engine.add_request("b", PARAMS)
    while engine.has_unfinished_requests():
        engine.step()
    # The queue is empty, and s still holds two of its three places: its next step fits.
    with pytest.raises(QueueFullError):
        engine.add_request("b", PARAMS, queue_places=2)
    engine.add_request("b", PARAMS, request_id="b")
    engine.add_request("x", PARAMS, request_id="s-2", held_by="s")
    engine.add_request("x", PARAMS, request_id="s-3", held_by="s")
    engine.release_places("s")
    engine.abort_request("b")  # (its place is free now, and s's are given back)
    engine.add_request("c", PARAMS, request_id="c")
    with pytest.raises(QueueFullError):
        engine.add_request("d", PARAMS)
    while engine.has_unfinished_requests():
        engine.step()
    for rid in "def":
        engine.add_request("d", PARAMS, request_id=rid)


@pytest.mark.parametrize("max_waiting", [0, -1])
def test_a_queue_that_holds_nothing_is_refused(max_waiting):
    """max_waiting 0 was accepted, and then no request could ever be queued: generate raised
    QueueFullError, the server answered 503 to everything."""
    with pytest.raises(ValueError, match=f"max_waiting must be >= 1 .*got {max_waiting}"):
        LLM(num_gpu_blocks=64, max_model_len=64, max_waiting=max_waiting)


def test_an_error_midway_takes_back_what_was_queued(monkeypatch):
    llm = LLM(num_gpu_blocks=64, max_model_len=64)
    calls = []

    def interrupted():
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["x", "y", "z"], PARAMS, use_tqdm=False)
    assert calls and not llm.engine.has_unfinished_requests() and not llm.engine.requests


@pytest.mark.parametrize("params", [{"max_tokens": 4}, [PARAMS, {"max_tokens": 4}]])
def test_sampling_params_of_the_wrong_type_are_refused(params):
    llm = LLM(num_gpu_blocks=64, max_model_len=64)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate(["x", "y"], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("policy, warned", [("fcfs", True), ("vtc", True), ("priority", False),
                                            ("trace", False)])
def test_a_priority_the_policy_ignores_is_named_once(policy, warned, caplog):
    """vLLM refuses a priority when it does not schedule by priority; here it is accepted (a
    trace replayed under fcfs for comparison carries its priorities) but said, once."""
    llm = LLM(num_gpu_blocks=64, max_model_len=64, max_num_seqs=1, policy=policy)
    with caplog.at_level("WARNING", logger="fairswitch.engine.engine"):
        llm.generate(["a", "b", "c"], PARAMS, use_tqdm=False, priority=[0, 2, 1])
    said = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    if warned:
        assert said == [f"request priority 2 is ignored: policy '{policy}' does not rank by "
                        "priority (--policy priority or trace does); further ones are not "
                        "reported"]
    else:
        assert said == []


def test_truncate_prompt_tokens_keeps_the_prompts_end_offline():
    """vLLM's SamplingParams.truncate_prompt_tokens (the server had it, LLM did not): only the
    prompt's last k tokens are computed, so a prompt longer than the context can still run."""
    llm = LLM(num_gpu_blocks=64, max_model_len=64)
    tok = llm.get_tokenizer()
    long = " ".join(f"word{i}" for i in range(200))
    ids = tok.encode(long)
    assert len(ids) > 64
    greedy = dict(max_tokens=4, temperature=0.0, ignore_eos=True)
    cut = llm.generate([long], SamplingParams(truncate_prompt_tokens=20, **greedy),
                       use_tqdm=False)[0]
    tail = llm.generate([ids[-20:]], SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-20:] and cut.prompt == long
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt has"):
        llm.generate([long], SamplingParams(**greedy), use_tqdm=False)
    fit = llm.generate([long], SamplingParams(truncate_prompt_tokens=-1, max_tokens=1),
                       use_tqdm=False)[0]  # (all that leave room for one token)
    assert fit.prompt_token_ids == ids[-63:] and len(fit.outputs[0].token_ids) == 1
    assert len(llm.embed(long, truncate_prompt_tokens=-1, use_tqdm=False)[0]
               .prompt_token_ids) == 63
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens \(64\) must be less than"):
        llm.generate([long], SamplingParams(truncate_prompt_tokens=64, **greedy), use_tqdm=False)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="truncate_prompt_tokens must be -1"):
            SamplingParams(truncate_prompt_tokens=bad)
