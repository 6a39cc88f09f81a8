"""FP8 KV (or, with ``--quantize weights``, FP8 weights) accuracy on the trained default model:
greedy agreement and next-token KL, fp8 vs the model's own dtype (bf16 on CUDA, fp32 on the CPU),
in one run.

    python3 benchmarks/fp8_kv_accuracy.py --output benchmarks/results/fp8_kv_accuracy.json
    python3 benchmarks/fp8_kv_accuracy.py --quantize weights \
        --output benchmarks/results/fp8_weights_accuracy.json

Two engines, one per KV dtype, same weights, in one process: each takes a fixed KV cache
(``--kv-cache-memory-gib``, 2 GiB here), since sizing from free memory would leave the second
nothing. First each replies greedily to the same chat
prompts: how many replies are identical, and where the others first differ. Then both read the
reference engine's conversations (prompt + its reply) teacher-forced, and at every position of
the replies the two next-token distributions are compared: KL(reference || fp8), and whether
their most likely tokens agree. The full distributions come from the prompt-logprob path
(``prompt_logprobs=0``), whose log-softmax over the vocabulary this script records as it is
computed (``record_logprobs``).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from engine_options import add_engine_options, engine_config
from fairswitch.engine.llm import LLM
from fairswitch.runner import model_runner
from fairswitch.sampling_params import SamplingParams
from results_io import command_line, write_results
from workloads.chat_prompts import CHAT_PROMPTS

PROMPTS = CHAT_PROMPTS


@contextlib.contextmanager
def record_logprobs() -> Iterator[list[torch.Tensor]]:
    """Every prompt-logprob computation's full log-softmax rows, in call order."""
    rows: list[torch.Tensor] = []
    original = model_runner.token_logprobs

    def recording(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> Any:
        rows.append(logits.float().log_softmax(dim=-1).cpu())
        return original(logits, tokens, k)

    model_runner.token_logprobs = recording
    try:
        yield rows
    finally:
        model_runner.token_logprobs = original


def next_token_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log p(next token | ids[:i+1]) for every position i < len(ids) - 1: [len(ids) - 1, vocab]."""
    with record_logprobs() as rows:
        llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.cat(rows)[: len(ids) - 1]


def compare(reference: LLM, fp8: LLM, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    ref_out = reference.chat(conversations, greedy, use_tqdm=False)
    fp8_out = fp8.chat(conversations, greedy, use_tqdm=False)
    replies, kls, agree = [], [], []
    for r, f in zip(ref_out, fp8_out):
        a, b = r.outputs[0].token_ids, f.outputs[0].token_ids
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                          None if len(a) == len(b) else min(len(a), len(b)))
        replies.append({"tokens": len(a), "identical": first_diff is None,
                        "first_difference": first_diff})
        ids = r.prompt_token_ids + a
        p, q = next_token_logprobs(reference, ids), next_token_logprobs(fp8, ids)
        reply = slice(len(r.prompt_token_ids) - 1, len(ids) - 1)  # predicting the reply tokens
        p, q = p[reply], q[reply]
        kls.append((p.exp() * (p - q)).sum(-1))
        agree.append(p.argmax(-1) == q.argmax(-1))
    kl, top1 = torch.cat(kls), torch.cat(agree).float()
    return {"replies": replies, "positions": kl.numel(),
            "identical_replies": sum(r["identical"] for r in replies),
            "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(),
            "kl_max": kl.max().item(), "top1_agreement": top1.mean().item()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, fixed={"kv_cache_dtype": "auto, then fp8 (--quantize kv)",
                                 "quantization": "none, then fp8 (--quantize weights)"},
                       model="fairswitch-tiny", max_model_len=1024, kv_cache_memory_gib=2.0)
    p.add_argument("--quantize", choices=("kv", "weights"), default="kv",
                   help="what is fp8 in the second engine: the KV cache or the weights")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length (default: 64)")
    p.add_argument("--num-prompts", type=int, default=len(PROMPTS),
                   help=f"the first N of the built-in prompts (default: {len(PROMPTS)})")
    p.add_argument("--output", default=None, help="results JSON to write")
    p.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    args = p.parse_args(argv)
    base = engine_config(p, args)
    reference = LLM.from_config(base.with_options(kv_cache_dtype="auto", quantization=None))
    fp8 = LLM.from_config(base.with_options(kv_cache_dtype="fp8") if args.quantize == "kv"
                          else base.with_options(kv_cache_dtype="auto", quantization="fp8"))
    figures = compare(reference, fp8, PROMPTS[:args.num_prompts], args.max_tokens)
    figures["reference_kv_dtype"] = str(reference.engine.kv.cache.tensor.dtype)
    figures["reference_dtype"] = str(reference.engine.dtype)
    figures["model"], figures["quantized"] = args.model, args.quantize
    what = "KV" if args.quantize == "kv" else "weights"
    ref_dtype = figures["reference_kv_dtype" if args.quantize == "kv" else "reference_dtype"]
    print(f"fp8 {what} vs {ref_dtype} {what} on {args.model}: "
          f"{figures['identical_replies']}/{len(figures['replies'])} greedy replies identical; "
          f"over {figures['positions']} reply positions: top-1 agreement "
          f"{figures['top1_agreement']:.4f}, KL mean {figures['kl_mean']:.2e} "
          f"(P99 {figures['kl_p99']:.2e}, max {figures['kl_max']:.2e}) nats")
    prefix = f"fp8_{args.quantize}"
    claims = [{"name": f"{prefix}_top1_agreement", "value": figures["top1_agreement"],
               "unit": "fraction"},
              {"name": f"{prefix}_next_token_kl_mean", "value": figures["kl_mean"],
               "unit": "nats"},
              {"name": f"{prefix}_identical_greedy_replies",
               "value": figures["identical_replies"] / len(figures["replies"]),
               "unit": "fraction"}]
    if args.output:
        write_results(args.output, command=command_line(), figures=figures, claims=claims,
                      commit=args.commit)
    return figures


if __name__ == "__main__":
    main()
