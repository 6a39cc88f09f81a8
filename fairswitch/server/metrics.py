"""/metrics: Prometheus text format (version 0.0.4) with vLLM's names under ``fairswitch:`` (or
another prefix: ``--metrics-prefix vllm:`` for dashboards and autoscalers built for vLLM).

Two sources. Engine-side gauges and counters (queue lengths, KV usage, preemptions) are read on
the engine thread between steps when /metrics is scraped. Latency histograms and token counters
are fed by the server as outputs stream by, one ``RequestTracker`` per request:

- TTFT = first_token_time - arrival_time (engine clock: both fields are set once);
- TBT (``time_per_output_token_seconds``) = every gap between consecutive tokens of a request, timed
  when the server receives each output (``RequestOutput.metrics`` is the request's live record,
  so its ``last_token_time`` may already belong to a later token when a stream lags);
- E2E = finished_time - arrival_time, for requests that finished (stop or length).

Reuse hits from KV kept on the CPU are exported as 0 until the engine has them, so dashboards can
be built against the final set of names.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from fairswitch.outputs import RequestOutput
from fairswitch.server.settings import DEFAULT_METRICS_PREFIX

PREFIX = DEFAULT_METRICS_PREFIX
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TBT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(float(m * 10 ** e) for e in range(7) for m in (1, 2, 5))  # 1, 2, 5, 10...
# A finished request's phases (vLLM's names): arrival -> first scheduled -> first token -> end.
PHASES = (("queue", "arrival_time", "first_scheduled_time", "waiting before it first ran"),
          ("prefill", "first_scheduled_time", "first_token_time",
           "from first running to its first token"),
          ("decode", "first_token_time", "finished_time", "from its first token to its last"),
          ("inference", "first_scheduled_time", "finished_time",
           "from first running to its last token"))

Sample = tuple[str, dict[str, str], float]  # (name suffix, labels, value)


# ---- the text format ---------------------------------------------------------------------------

def _escape(value: str, quote: bool = True) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace("\"", "\\\"") if quote else value


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_family(name: str, kind: str, help: str, samples: Iterable[Sample]) -> str:
    """One metric family: its HELP and TYPE lines, then one line per sample."""
    lines = [f"# HELP {name} {_escape(help, quote=False)}",
             f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        lines.append(f"{name}{suffix}{{{label_text}}} {_number(value)}" if label_text
                     else f"{name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self, labels: dict[str, str]) -> list[Sample]:
        out: list[Sample] = []
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            cumulative += n
            le = "+Inf" if math.isinf(bound) else repr(float(bound))  # "1.0", as client_python
            out.append(("_bucket", {**labels, "le": le}, cumulative))
        out.append(("_sum", labels, self.sum))
        out.append(("_count", labels, self.count))
        return out


# ---- what the server records -------------------------------------------------------------------

class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = PREFIX) -> None:
        self.labels = {"model_name": model_name}
        self.prefix = prefix
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tbt = Histogram(TBT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.phases = {name: Histogram(E2E_BUCKETS) for name, *_ in PHASES}
        self.prompt_lengths = Histogram(TOKEN_BUCKETS)
        self.generation_lengths = Histogram(TOKEN_BUCKETS)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished: Counter[str] = Counter()
        self.num_aborted = 0

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self, engine: dict[str, Any]) -> str:
        """The exposition text, given ``engine_snapshot()`` taken on the engine thread."""
        lab = self.labels

        def one(name: str, kind: str, help: str, value: float, **labels: str) -> str:
            return format_family(self.prefix + name, kind, help, [("", {**lab, **labels}, value)])

        parts = [
            one("num_requests_running", "gauge", "Requests in the running batch.",
                engine["num_running"]),
            one("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                engine["num_waiting"]),
            one("num_requests_swapped", "gauge", "Requests whose KV cache is swapped to CPU.",
                engine["num_swapped"]),
            one("gpu_cache_usage_perc", "gauge", "Fraction of device KV blocks holding live "
                "requests' KV, or copies in flight (0 to 1; blocks kept for reuse excluded).",
                engine["gpu_kv_usage"]),
            one("kv_cache_usage_perc", "gauge", "The same as gpu_cache_usage_perc (vLLM V1's "
                "name).", engine["gpu_kv_usage"]),
            one("cpu_cache_usage_perc", "gauge", "Fraction of CPU KV blocks holding live "
                "requests' KV: swapped out, or kept for the next swap-out (0 to 1).",
                engine["cpu_kv_usage"]),
            one("gpu_cache_reuse_perc", "gauge", "Fraction of device KV blocks kept for reuse: "
                "finished requests' prefixes no live request holds (evicted when needed).",
                engine["gpu_kv_reuse"]),
            one("cpu_cache_reuse_perc", "gauge", "Fraction of CPU KV blocks kept for reuse: the "
                "CPU tier of the prefix cache (evicted when needed).", engine["cpu_kv_reuse"]),
            format_family(self.prefix + "num_preemptions_total", "counter",
                          "Preemptions, by how the victim's KV is restored (swap or recompute).",
                          [("", {**lab, "mode": mode}, engine[f"preemptions_{mode}"])
                           for mode in ("recompute", "swap")]),
            one("num_rank_preemptions_total", "counter", "Of the preemptions: those made for "
                "a better-ranked queued request (the others: KV blocks ran out).",
                engine["preemptions_rank"]),
            format_family(self.prefix + "swap_bytes_total", "counter",
                          "KV cache bytes copied between device and CPU (every "
                          "tensor-parallel rank's).",
                          [("", {**lab, "direction": d}, engine[f"swap_bytes_{d}"])
                           for d in ("out", "in")]),
            one("swap_copies_total", "counter", "Copies issued to move KV between device and "
                "CPU (every tensor-parallel rank's).", engine["swap_copies"]),
            format_family(self.prefix + "swap_busy_seconds_total", "counter",
                          "Device time spent copying KV, by direction (CUDA only; the two "
                          "directions overlap when swaps run full duplex).",
                          [("", {**lab, "direction": d}, engine[f"swap_busy_s_{d}"])
                           for d in ("out", "in")]),
            format_family(self.prefix + "swap_queued_seconds_total", "counter",
                          "Device time copies were ready to start but waited behind earlier "
                          "copies on their stream, by direction (in: swap-ins and fetches).",
                          [("", {**lab, "direction": d}, engine[f"swap_queued_s_{d}"])
                           for d in ("out", "in")]),
            one("switch_stall_seconds_total", "counter", "Time the device sat idle for context "
                "switches (host time in the swap manager, copy waits included).",
                engine["switch_stall_s"]),
            one("switch_wait_seconds_total", "counter", "Of the stall: time blocked waiting "
                "for copies to land.", engine["switch_wait_s"]),
            format_family(self.prefix + "kv_reuse_hits_total", "counter",
                          "Prompt tokens whose KV was reused from an earlier request, by where "
                          "it was kept (GPU prefix cache, or its CPU tier: fetched back).",
                          [("", {**lab, "tier": "gpu"}, engine["reused_tokens"]),
                           ("", {**lab, "tier": "cpu"}, engine["reused_tokens_cpu"])]),
            one("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix "
                "cache (at a request's first admission).", engine["queried_tokens"]),
            one("prefix_cache_hits_total", "counter", "Of those, tokens whose KV was found (GPU "
                "or CPU tier).", engine["reused_tokens"] + engine["reused_tokens_cpu"]),
            one("gc_pause_seconds_total", "counter", "Time the process spent in garbage "
                "collections (they hold the GIL: the engine's step waits).",
                engine["gc_pause_s"]),
            one("kernel_compile_seconds_total", "counter", "Time spent compiling Triton kernels "
                "(after start-up each compile stalls a step: a new kernel specialization).",
                engine["kernel_compile_s"]),
            one("prompt_tokens_total", "counter", "Prompt tokens of requests that started "
                "generating (reused ones included).",
                self.num_prompt_tokens),
            one("generation_tokens_total", "counter", "Generated tokens.",
                self.num_generation_tokens),
            format_family(self.prefix + "request_success_total", "counter",
                          "Requests that finished, by finish reason.",
                          [("", {**lab, "finished_reason": r}, self.num_finished[r])
                           for r in ("stop", "length")]),
            one("request_aborted_total", "counter", "Requests aborted before they finished "
                "(client went away, shutdown).", self.num_aborted),
            format_family(self.prefix + "time_to_first_token_seconds", "histogram",
                          "Time to first token.", self.ttft.samples(lab)),
            format_family(self.prefix + "time_per_output_token_seconds", "histogram",
                          "Time between consecutive tokens of a request (every gap).",
                          self.tbt.samples(lab)),
            format_family(self.prefix + "inter_token_latency_seconds", "histogram",
                          "The same as time_per_output_token_seconds (vLLM V1's name).",
                          self.tbt.samples(lab)),
            format_family(self.prefix + "e2e_request_latency_seconds", "histogram",
                          "Arrival to last token of finished requests.", self.e2e.samples(lab)),
            *(format_family(self.prefix + f"request_{name}_time_seconds", "histogram",
                            f"Time a finished request spent {what}.",
                            self.phases[name].samples(lab)) for name, _, _, what in PHASES),
            format_family(self.prefix + "request_prompt_tokens", "histogram",
                          "Prompt tokens of finished requests.",
                          self.prompt_lengths.samples(lab)),
            format_family(self.prefix + "request_generation_tokens", "histogram",
                          "Generated tokens of finished requests.",
                          self.generation_lengths.samples(lab)),
        ]
        if engine.get("lora") is not None:
            parts.append(one("lora_requests_info", "gauge", "LoRA adapters of running and "
                             "waiting requests, in its labels (vLLM's); the value is the time "
                             "of the snapshot.", time.time(), **engine["lora"]))
        return "".join(parts)


def engine_snapshot(engine: Any) -> dict[str, Any]:
    """Queue lengths and ``Engine.switch_metrics()``; run on the engine thread
    (``AsyncEngine.run_in_engine``)."""
    sched = engine.scheduler
    lora = None
    if engine.config.lora.enable_lora:  # (vLLM's lora_requests_info: adapters' names)
        def names(reqs: Any) -> str:
            return ",".join(sorted({r.lora_adapter.name for r in reqs if r.lora_adapter}))
        lora = {"max_lora": str(engine.config.lora.max_loras),
                "running_lora_adapters": names(sched.running),
                "waiting_lora_adapters": names([*sched.waiting, *sched.swapped])}
    return {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
            "lora": lora, **engine.switch_metrics()}


class RequestTracker:
    """Feeds one request's outputs into ServerMetrics; ``close()`` when the stream ends. Keeps
    the request's own output token count and TTFT for its access line."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_token_time: float | None = None  # server clock
        self.finished = False
        self.num_output_tokens = 0
        self.ttft_s: float | None = None

    def observe(self, out: RequestOutput) -> None:
        m = self.metrics
        num_new = len(out.outputs[0].new_token_ids)
        now = time.monotonic()
        if num_new and self.last_token_time is None:
            m.num_prompt_tokens += len(out.prompt_token_ids)
            if out.metrics is not None and out.metrics.first_token_time is not None:
                self.ttft_s = out.metrics.first_token_time - out.metrics.arrival_time
                m.ttft.observe(self.ttft_s)
        elif num_new:
            gap = (now - self.last_token_time) / num_new
            for _ in range(num_new):
                m.tbt.observe(gap)
        if num_new:
            self.last_token_time = now
        self.num_output_tokens += num_new
        m.num_generation_tokens += num_new
        if out.finished:
            self.finished = True
            reason = out.outputs[0].finish_reason
            if reason == "abort":
                m.num_aborted += 1
                return
            m.num_finished[reason or "stop"] += 1
            m.prompt_lengths.observe(len(out.prompt_token_ids))
            m.generation_lengths.observe(len(out.outputs[0].token_ids))
            times = out.metrics
            if times is not None and times.finished_time is not None:
                m.e2e.observe(times.finished_time - times.arrival_time)
                for name, start, end, _ in PHASES:
                    if getattr(times, start) is not None and getattr(times, end) is not None:
                        m.phases[name].observe(getattr(times, end) - getattr(times, start))

    def count_tokens(self, out: RequestOutput, own_prompt: bool = False) -> None:
        """Another choice of the same request (n > 1, or a batch of prompts): its tokens count,
        its timing does not; ``own_prompt``: the first choice of another prompt of the batch,
        whose prompt tokens count too."""
        num_new = len(out.outputs[0].new_token_ids)
        if own_prompt and num_new and num_new == len(out.outputs[0].token_ids):  # its first
            self.metrics.num_prompt_tokens += len(out.prompt_token_ids)
        self.num_output_tokens += num_new
        self.metrics.num_generation_tokens += num_new

    def refused(self) -> None:
        """The engine refused the request (a 400 or 503 before it began): it counts as nothing,
        not as an abort."""
        self.finished = True

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.metrics.num_aborted += 1
