"""Helpers the tests share (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def hf_greedy(model_dir: Path, prompt_ids: list[int], n: int, dtype=torch.float32,
              device: str = "cpu") -> list[int]:
    """Reference: transformers' own model, full recompute each step, plain argmax."""
    model = hf_model(model_dir, dtype, device)
    ids = torch.tensor([prompt_ids], device=device)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


_HF_CACHE: dict = {}


def hf_model(model_dir: Path, dtype, device):
    key = (str(model_dir), dtype, device)
    if key not in _HF_CACHE:
        from transformers import AutoModelForCausalLM

        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype).to(device).eval()
    return _HF_CACHE[key]


def run_logged(inside_each_step, max_tokens: int):
    """A tiny engine with a step log serves one request of ``max_tokens`` tokens to the end,
    calling ``inside_each_step()`` inside every model step; returns the engine, its step log
    and its switch metrics from before serving. Its steps run in turn (no async scheduling), so
    each step-log row holds exactly one launch."""
    from fairswitch import LLM, SamplingParams
    from fairswitch.engine.step_log import StepLog

    engine = LLM(num_gpu_blocks=32, block_size=4, max_model_len=64, async_scheduling=False).engine
    engine.step_log = log = StepLog()
    launch = engine.runner.launch  # every step launches (execute = launch + collect)

    def launch_with(*args, **kwargs):
        inside_each_step()
        return launch(*args, **kwargs)

    engine.runner.launch = launch_with
    engine.add_request("logged", SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    before = engine.switch_metrics()
    while engine.has_unfinished_requests():
        engine.step()
    return engine, log, before


def slow_link(swap, delay: int, duplex: bool = True) -> None:
    """Every swap copy lands ``delay`` polls late or later (copy_backend.DelayedCopyBackend).
    Duplex: swap-outs, swap-ins and write-backs each on a stream of their own, at different
    delays, so that copies land out of submission order across streams; else one stream."""
    from fairswitch.kv.copy_backend import DelayedCopyBackend

    if duplex:
        swap.set_backends(DelayedCopyBackend(delay), DelayedCopyBackend(delay + 1),
                          DelayedCopyBackend(delay + 2))
    else:
        one = DelayedCopyBackend(delay)
        swap.set_backends(one, one, one)


@contextlib.contextmanager
def openai_servers(settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The real ``openai`` client on a server per ``ServerSettings`` (by name), all over one
    engine of the default model (256 blocks, 256 tokens of context)."""
    import openai

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=256,
                                                              max_model_len=256))
    try:
        with contextlib.ExitStack() as stack:
            clients = {}
            for name, each in settings.items():
                srv = stack.enter_context(BackgroundServer(build_app(engine, each,
                                                                     shutdown_engine=False)))
                clients[name] = stack.enter_context(openai.OpenAI(
                    base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60))
            yield clients
    finally:
        engine.shutdown()


def literal_regex(text: str) -> str:
    """A regex (structured output's) matching ``text`` alone: a reply held to be it."""
    return "".join("\\" + ch if ch in "\\.^$|?*+()[]{}" else ch for ch in text)
