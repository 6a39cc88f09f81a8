"""``fairswitch generate``: run prompts through the engine offline and print the completions."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fairswitch.cli.files import read_chat_template, read_text
from fairswitch.config import EngineConfig, add_engine_args


def add_parser(subs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subs.add_parser("generate", help="generate completions for prompts (offline)",
                        description="Generate completions for one or more prompts.")
    p.add_argument("prompts", nargs="*", help="prompt text(s)")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="file with one prompt per line (or a .jsonl of {\"prompt\": ...})")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default: 0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    s.add_argument("--top-k", type=int, default=0, help="0 = disabled (default: 0)")
    s.add_argument("--sampling-seed", type=int, default=None,
                   help="per-request sampling seed (same seed, same output)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--stop-token-ids", type=_token_ids, action="extend", default=[],
                   metavar="ID[,ID...]",
                   help="stop token ids, comma-separated (repeatable; one value each, so a "
                        "prompt after it stays a prompt)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message: reply through the chat template")
    p.add_argument("--chat-template", default=None,
                   help="with --chat: Jinja chat template (a file, or the template itself) "
                        "replacing the tokenizer's (default: the tokenizer's, else a plain-text "
                        "one)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_engine_args(p)
    p.set_defaults(run=run)
    return p


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids like 5 or 5,7, got {text!r}") from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        text = read_text(args.prompts_file, "prompts file")
        # At line ends only (\n, \r\n, \r): splitlines() also breaks at U+2028, form feeds and
        # others, which JSON writes unescaped inside strings and a prompt may hold.
        for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
            if not line.strip():
                continue
            if args.prompts_file.suffix.lower() == ".jsonl":
                prompts.append(_jsonl_prompt(line, f"{args.prompts_file}:{n}"))
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts given (pass them as arguments or with --prompts-file)")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from e
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise ValueError(f"{where}: expected {{\"prompt\": ...}}, got {line.strip()[:80]}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: \"prompt\" must be a string, got {prompt!r}")
    if not prompt:
        raise ValueError(f"{where}: \"prompt\" is empty")
    return prompt


def run(args: argparse.Namespace) -> int:
    from fairswitch.engine.llm import LLM
    from fairswitch.sampling_params import SamplingParams

    prompts = _read_prompts(args)
    if args.chat_template is not None and not args.chat:
        raise ValueError("--chat-template needs --chat (prompts are sent as they are otherwise)")
    template = read_chat_template(args.chat_template)  # (checked before the model loads)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.sampling_seed, stop=args.stop, stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos)
    config = EngineConfig.from_cli_args(args)
    # No more requests than prompts ever run at once; on a CPU this also sizes the KV cache
    # (every running request at full length) to what the prompts can use.
    config.scheduler.max_num_seqs = min(config.scheduler.max_num_seqs, len(prompts))
    llm = LLM.from_config(config)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                           use_tqdm=not args.no_progress, chat_template=template)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    for prompt, out in zip(prompts, outputs):
        c = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}))
        elif args.chat:
            print(f"> {prompt}\n{c.text}")
        else:
            print(f"{out.prompt}{c.text}")
            print(f"  [{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]",
                  file=sys.stderr)
    return 0

