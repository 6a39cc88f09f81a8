"""VTC's counters charge exactly what each step serves (``Scheduler._charge``): as steps are
scheduled, so that with async scheduling a decision counts the step in flight; prompt tokens once
and output tokens once, whatever preemption recomputes or swaps; lost and dropped tokens taken
back. And how VTC, request priorities and rank preemption combine (docs/architecture.md,
"Fairness: VTC, priorities and preemption").

The scheduler runs on a real KV memory on the CPU with fabricated tokens (``Harness`` from
test_scheduler_policies.py), stepped in turn or one step ahead as the engine does; then the real
engine with the default model."""

from __future__ import annotations

import random

import pytest
from test_scheduler_policies import NO_PREEMPT, Harness

from fairswitch import LLM, SamplingParams
from fairswitch.config import parse_client_weights
from fairswitch.request import Request, RequestStatus
from fairswitch.scheduler.scheduler import Scheduler

STOP = 7  # the token a request that should stop samples; every other sampled token is 2


class Ledger:
    """The service each client got, worked out from the requests themselves: per request, the
    most prompt tokens its KV held after a step that was not reverted, and its output tokens
    (those of steps in flight included); and the lifts its counter got as it became backlogged.
    Wraps the scheduler's ``add_request``, ``schedule`` and ``revert``."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.prompt: dict[Request, int] = {}
        self.lifts: dict[str | None, float] = {}
        config = sched.config
        self.w_in, self.w_out = config.vtc_input_weight, config.vtc_output_weight
        self.weights = parse_client_weights(config.client_weights)
        add_request, schedule, revert = sched.add_request, sched.schedule, sched.revert
        counters = getattr(sched.ranking, "counters", {})

        def tracked_add_request(req, *args):
            before = counters.get(req.client_id, 0.0)
            add_request(req, *args)
            lift = counters.get(req.client_id, 0.0) - before
            self.lifts[req.client_id] = self.lifts.get(req.client_id, 0.0) + lift

        def tracked_schedule():
            out = schedule()
            out.ledger_before = {r: self.prompt.get(r, 0) for r, _ in out.scheduled}
            for req, _ in out.scheduled:
                held = min(req.num_computed_tokens, req.num_prompt_tokens)
                self.prompt[req] = max(self.prompt.get(req, 0), held)
            return out

        def tracked_revert(out):
            self.prompt.update(out.ledger_before)  # newest step first, as the scheduler asks
            revert(out)

        sched.add_request = tracked_add_request
        sched.schedule, sched.revert = tracked_schedule, tracked_revert

    def service(self) -> dict[str | None, float]:
        got: dict[str | None, float] = {}
        for req, prompt in self.prompt.items():
            weight = self.weights.get(req.client_id, 1.0)
            cost = self.w_in * prompt + self.w_out * req.num_output_tokens
            got[req.client_id] = got.get(req.client_id, 0.0) + cost / weight
        return got

    def check(self) -> None:
        """Each request's charge equals its service, each counter its client's, plus lifts."""
        for req, prompt in self.prompt.items():
            assert req.num_charged_prompt_tokens == prompt, req.request_id
            assert req.num_charged_output_tokens == req.num_output_tokens, req.request_id
        service = self.service()
        counters = getattr(self.sched.ranking, "counters", {})  # only vtc keeps counters
        for client, counter in counters.items():
            expected = service.get(client, 0.0) + self.lifts.get(client, 0.0)
            assert counter == pytest.approx(expected, rel=1e-12), client


def final_service(reqs: list[Request], sched: Scheduler) -> dict[str | None, float]:
    """After a run: input weight x prompt + output weight x tokens the client got, over weight."""
    config = sched.config
    weights = parse_client_weights(config.client_weights)
    got: dict[str | None, float] = {}
    for req in reqs:
        assert req.is_finished and req.num_output_tokens > 0
        cost = (config.vtc_input_weight * req.num_prompt_tokens
                + config.vtc_output_weight * len(req.output_token_ids))
        got[req.client_id] = got.get(req.client_id, 0.0) + cost / weights.get(req.client_id, 1.0)
    return got


class Driver(Harness):
    """``Harness`` stepped in turn, or (``ahead``) as the engine does with async scheduling:
    step N+1 is scheduled before step N's tokens are handed back. A request given ``stop_at``
    samples STOP as its ``stop_at``-th token (a stop token: it ends while a step is in flight).
    The ledger is checked after every step."""

    def __init__(self, policy: str = "vtc", ahead: bool = False, **config) -> None:
        super().__init__(policy, **config)
        self.ahead = ahead
        self.in_flight = None
        self.ledger = Ledger(self.sched)
        self.stop_at: dict[Request, int] = {}
        self.num_sampled: dict[Request, int] = {}
        self.num_computed = 0  # tokens computed by the steps handed back (the server's work)

    def add(self, prompt_len: int = 8, max_tokens: int = 4, priority: int = 0,
            client: str | None = None, stop_at: int | None = None) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop_token_ids=[STOP])
        req = Request(f"r{self._n}", [1] * prompt_len, params, self.clock.t, priority=priority,
                      client_id=client)
        self._n += 1
        self.sched.tokens.init_request(req)
        self.sched.add_request(req)
        self.live.append(req)
        if stop_at is not None:
            self.stop_at[req] = stop_at
        return req

    def step(self):
        out = self.sched.schedule()
        for req, _ in out.scheduled:
            if req not in self.admitted:
                self.admitted.append(req)
        if self.ahead:
            done, self.in_flight = self.in_flight, (out if out.scheduled else None)
        else:
            done = out
        if done is not None:
            self.hand_back(done)
        self.memory.check(self.live)
        self.ledger.check()
        self.clock.t += self.dt
        return out

    def hand_back(self, out) -> None:
        self.num_computed += out.num_batched_tokens
        sampled = {}
        for req, _, _, samples in out.chunks():
            if samples:
                k = self.num_sampled[req] = self.num_sampled.get(req, 0) + 1
                sampled[req] = STOP if k == self.stop_at.get(req) else 2
        for req in self.sched.update_from_output(out, sampled):
            if req.is_finished:
                self.finished.append(req)
                self.live.remove(req)

    def abort(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED_ABORTED
        self.sched.finish(req)
        self.live.remove(req)

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished() and self.in_flight is None:
                return
            self.step()
        raise AssertionError("did not finish")


# ---- what is charged, and when ---------------------------------------------------------------

def test_a_step_is_charged_as_it_is_scheduled_not_when_its_tokens_are_back():
    h = Driver(ahead=True, client_weights="a=2")
    counters = h.sched.ranking.counters
    h.add(prompt_len=10, max_tokens=5, client="a")
    h.add(prompt_len=6, max_tokens=5, client="b")
    h.step()  # step 1 (both prompts, each samples its first token) is in flight; nothing back
    assert counters == {"a": (10 + 2 * 1) / 2, "b": 6 + 2 * 1}
    h.step()  # step 2 (a decode each) in flight, step 1's tokens back
    assert counters == {"a": (10 + 2 * 2) / 2, "b": 6 + 2 * 2}


@pytest.mark.parametrize("ahead", [False, True], ids=["in_turn", "ahead"])
def test_counters_equal_the_service_after_every_step(ahead):
    """Chunked prefills, weighted clients, custom weights, requests ending by a stop token
    (with a step in flight: the token it samples then is dropped and taken back)."""
    rng = random.Random(1)
    h = Driver(ahead=ahead, max_num_seqs=4, max_num_batched_tokens=24, client_weights="a=2,b=0.5",
               vtc_input_weight=1.5, vtc_output_weight=3.0)
    reqs = [h.add(rng.randint(3, 40), rng.randint(1, 12), client=rng.choice("abc"),
                  stop_at=rng.choice([None, 1, 2, 5])) for _ in range(24)]
    h.run()  # the ledger is checked after every step
    assert any(r.stop_reason == STOP for r in reqs)
    assert {r.client_id for r in reqs} == {"a", "b", "c"}
    final = final_service(reqs, h.sched)
    assert h.sched.ranking.counters == pytest.approx(final, rel=1e-12)


@pytest.mark.parametrize("ahead", [False, True], ids=["in_turn", "ahead"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_charges_no_token_twice(mode, ahead):
    """Recompute prefills prompts and generated tokens again, a swap computes nothing: either
    way each prompt token and each output token is charged once."""
    rng = random.Random(2)
    h = Driver(ahead=ahead, num_blocks=16, cpu_blocks=200 if mode == "swap" else 0,
               max_num_seqs=8, min_run_steps=1, growth_headroom=0, preemption_mode=mode,
               client_weights="a=3")
    reqs = [h.add(rng.randint(2, 12), rng.randint(2, 14), client=rng.choice("ab"))
            for _ in range(16)]
    h.run()
    by_mode = h.sched.preemptions_by_mode
    assert by_mode[mode] > 0 and by_mode["swap" if mode == "recompute" else "recompute"] == 0
    assert h.sched.ranking.counters == pytest.approx(final_service(reqs, h.sched), rel=1e-12)
    once = sum(r.num_prompt_tokens + r.num_output_tokens - 1 for r in reqs)
    if mode == "recompute":
        assert h.num_computed > once  # the server computed more than it charged
    else:
        assert h.num_computed == once


def test_revert_takes_the_charge_back():
    """The engine's error path (``Engine._abandon``): the step in flight and the step scheduled
    behind it are lost and reverted, newest first; one request was aborted meanwhile (its
    tokens in flight were taken back then, not again)."""
    h = Driver(max_num_batched_tokens=16, client_weights="b=2")
    counters = h.sched.ranking.counters
    reqs = [h.add(8, 10, client="a"), h.add(8, 10, client="b"), h.add(40, 6, client="b")]
    for _ in range(2):
        h.step()  # in turn: nothing in flight
    assert 0 < reqs[2].num_computed_tokens < 40  # its prompt is still being prefilled
    before = (dict(counters), [(r.num_charged_prompt_tokens, r.num_charged_output_tokens,
                                list(r.token_ids)) for r in reqs])
    first = h.sched.schedule()
    second = h.sched.schedule()  # scheduled behind ``first``, before its tokens are back
    h.ledger.check()
    assert counters["a"] > before[0]["a"] and counters["b"] > before[0]["b"]
    h.abort(reqs[0])  # its placeholders go, and their charge with them
    h.ledger.check()
    h.sched.revert(second)
    h.sched.revert(first)
    h.ledger.check()
    assert (counters, [(r.num_charged_prompt_tokens, r.num_charged_output_tokens,
                        list(r.token_ids)) for r in reqs]) == before
    h.run()
    final = final_service(reqs[1:], h.sched)
    final["a"] = 8 + 2 * reqs[0].num_output_tokens
    assert counters == pytest.approx(final, rel=1e-12)


def test_weighted_clients_advance_by_cost_over_weight():
    h = Driver(max_num_seqs=2, client_weights="a=2,b=0.5", vtc_input_weight=1.5,
               vtc_output_weight=3.0)
    h.add(8, 10, client="a")
    h.add(8, 10, client="b")
    for i in range(1, 11):  # side by side: the same service each step
        h.step()
        cost = 1.5 * 8 + 3.0 * i
        assert h.sched.ranking.counters == {"a": cost / 2, "b": cost / 0.5}


def test_the_lift_counts_the_step_in_flight_and_no_dropped_token():
    h = Driver(ahead=True, max_num_seqs=4, client_weights="a=2")
    counters = h.sched.ranking.counters
    h.add(8, 30, client="a")
    h.add(8, 30, client="b")
    for _ in range(5):
        h.step()
    # c becomes backlogged: lifted to the lowest backlogged counter, the step in flight counted.
    h.add(8, 4, client="c")
    service = h.ledger.service()
    assert counters["c"] == service["a"] == min(counters["a"], counters["b"])

    # Nobody backlogged: a newcomer is lifted to the counter of the last client to leave, which
    # does not count the token sampled for it by the step in flight when it stopped.
    h = Driver(ahead=True)
    counters = h.sched.ranking.counters
    r = h.add(8, 20, client="a", stop_at=3)
    h.run()
    assert r.output_token_ids == [2, 2, STOP] and h.num_sampled[r] == 4  # one more ran
    assert counters["a"] == 8 + 2 * 3
    h.add(client="b")
    assert counters["b"] == 8 + 2 * 3


# ---- VTC, priorities and rank preemption (docs/architecture.md) -----------------------------

@pytest.mark.parametrize("policy,starvation", [("vtc", 0.0), ("priority", 0.0), ("vtc", 0.05)])
def test_who_runs_next_service_against_priority(policy, starvation):
    """One seat. A client that has been served a lot (heavy) queues a priority-0 request; a
    client behind it queues a priority-9 one. Under vtc service decides and priorities are
    ignored; under priority the opposite; a starving request goes first whatever its service."""
    h = Driver(policy, max_num_seqs=1, max_starvation_s=starvation, dt=0.01, **NO_PREEMPT)
    running = h.add(8, 30, priority=5, client="heavy")
    h.step()
    urgent = h.add(8, 4, priority=0, client="heavy")
    light = h.add(8, 4, priority=9, client="light")
    h.run()
    if starvation:  # kept out 0.05 s: starving, it ranks first, and preempts whatever threshold
        assert h.admitted == [running, urgent, light]
        assert running.metrics.num_preemptions == 1
    elif policy == "vtc":
        assert h.admitted == [running, light, urgent]
    else:
        assert h.admitted == [running, urgent, light]
        assert not hasattr(h.sched.ranking, "counters")  # no service is counted


@pytest.mark.parametrize("policy", ["vtc", "priority"])
def test_rank_preemption_takes_the_latest_request_of_the_client_furthest_ahead(policy):
    """Two seats held by heavy's requests (priorities 5 and 0), light's (priority 9) queued.
    Under vtc light preempts once heavy's counter is ahead by more than the threshold, and the
    victim is heavy's latest request, though it has the best priority. Under priority, light's
    request is the worst: it preempts nobody."""
    threshold = 40.0
    h = Driver(policy, ahead=True, max_num_seqs=2, min_run_steps=2, cpu_blocks=400,
               preempt_threshold=threshold, max_starvation_s=0)
    counters = getattr(h.sched.ranking, "counters", {})
    first = h.add(8, 40, priority=5, client="heavy")
    latest = h.add(8, 40, priority=0, client="heavy")
    light = h.add(8, 40, priority=9, client="light")
    leads, preempted = [], []
    while light not in h.admitted:
        leads.append(counters.get("heavy", 0) - counters.get("light", 0))  # as the step starts
        preempted += h.step().preempted
    if policy == "priority":
        assert preempted == [] and first.is_finished and latest.is_finished
        return
    assert preempted == [latest] and latest in h.sched.swapped and first in h.sched.running
    assert leads[-1] > threshold >= leads[-2]  # at the first step it was allowed


# ---- the real engine ---------------------------------------------------------------------------

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,", "def main():"]


@pytest.fixture(scope="module")
def stop_tokens() -> list[int]:
    """Per prompt, the fourth token of its greedy reply: a stop token it meets."""
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = LLM(num_gpu_blocks=64, max_model_len=48, device="cpu").generate(PROMPTS, greedy,
                                                                          use_tqdm=False)
    return [o.outputs[0].token_ids[3] for o in outs]


@pytest.mark.parametrize("async_scheduling,mode", [(False, "recompute"), (True, "recompute"),
                                                   (True, "swap")])
def test_engine_counters_equal_the_service(stop_tokens, async_scheduling, mode):
    """The engine with the default model on the CPU, a cache small enough to preempt, requests
    that stop on a token (with async scheduling the step in flight samples one more for them),
    an abort and steps that fail after their launch (reverted): the counters equal the service
    after every step, and at the end what each client was given."""
    llm = LLM(num_gpu_blocks=16, block_size=4, max_model_len=48, device="cpu",
              swap_space=0.01, preemption_mode=mode, growth_headroom=0, min_run_steps=1,
              async_scheduling=async_scheduling, policy="vtc", client_weights="a=2,c=0.5")
    engine = llm.engine
    ledger = Ledger(engine.scheduler)
    reqs = []
    for i in range(10):
        stop = [stop_tokens[i % 4]] if i % 3 == 0 else []
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                stop_token_ids=stop)
        rid = engine.add_request(PROMPTS[i % 4], params, client_id="abc"[i % 3])
        reqs.append(engine.requests[rid])
    step = raised = 0

    def fail():
        if step % 5 == 3:
            raise KeyboardInterrupt

    engine.events.on_gpu_busy.append(fail)
    aborted = None
    while engine.has_unfinished_requests():
        step += 1
        try:
            engine.step()
        except KeyboardInterrupt:
            raised += 1
        ledger.check()
        if aborted is None and step >= 4:  # one in the step in flight if there is one
            step_in_flight = engine._in_flight.sched.scheduled if engine.step_in_flight else []
            candidates = [r for r, _ in step_in_flight] or engine.scheduler.running
            aborted = next((r for r in candidates if len(r.output_token_ids) > 1), None)
            if aborted is not None:
                engine.abort_request(aborted.request_id)
                ledger.check()
    assert aborted is not None and raised >= 2
    assert engine.scheduler.preemptions_by_mode[mode] > 0
    assert any(r.stop_reason is not None for r in reqs)
    final = final_service(reqs, engine.scheduler)
    assert engine.scheduler.ranking.counters == pytest.approx(final, rel=1e-12)
    engine.check_accounting()


def test_idle_clients_are_forgotten_without_changing_any_lift(monkeypatch):
    """Requests naming ever new clients leave a bounded number of counters behind, and a client
    that comes back after its counter was dropped is lifted exactly as if it had been kept."""
    from types import SimpleNamespace

    from fairswitch.config import SchedulerConfig
    from fairswitch.scheduler.ranking import VTCRanking

    def run(keep_idle: int) -> tuple[list[float], int]:
        monkeypatch.setattr(VTCRanking, "KEEP_IDLE", keep_idle)
        ranking = VTCRanking(SchedulerConfig(policy="vtc"))
        rng = random.Random(0)
        live, arrivals, most = [], [], 0
        for i in range(4000):
            client = f"new{i}" if i % 3 == 0 else f"c{rng.randrange(300)}"
            req = SimpleNamespace(client_id=client)
            ranking.on_arrival(req)
            arrivals.append(ranking.counters[client])
            live.append(req)
            for r in live:
                ranking.on_served(r, rng.randrange(20), rng.randrange(1, 4))
            while len(live) > 8 or (live and rng.random() < 0.5):
                ranking.on_finish(live.pop(rng.randrange(len(live))))
            most = max(most, len(ranking.counters))
        return arrivals, most

    kept, grew_to = run(10**9)
    forgot, bounded = run(16)
    assert forgot == kept  # every arrival's lifted counter
    assert grew_to > 1500 and bounded <= 2 * 9 + 16 + 1
