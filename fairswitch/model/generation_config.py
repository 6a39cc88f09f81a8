"""A checkpoint's generation_config.json: its EOS ids, and the sampling its makers recommend.

The recommended sampling becomes the defaults of requests, as in vLLM (``--generation-config
auto``, its default): a request that leaves ``temperature``, ``top_p``, ``top_k``, ``min_p`` or
``repetition_penalty`` unset gets the file's value (Llama 3 Instruct's: temperature 0.6, top_p
0.9), and its ``max_new_tokens`` bounds every request's ``max_tokens``. ``vllm`` (the name vLLM
gives it) keeps the built-in defaults; a folder takes the sampling from its generation_config.json.
The EOS ids always come from the checkpoint's own file. Other fields (``do_sample``,
``max_length``...) are ignored, as vLLM ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairswitch.model.checkpoint_config import check_token_ids, read_json
from fairswitch.sampling_params import SamplingParams

FILE = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
SOURCES = ("auto", "vllm")  # or a folder


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_id: int | list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # set SAMPLING_FIELDS, checked
    max_new_tokens: int | None = None

    def sampling_defaults(self) -> dict[str, Any]:
        """SamplingParams keywords: the recommended sampling, and max_new_tokens as max_tokens."""
        extra = {"max_tokens": self.max_new_tokens} if self.max_new_tokens else {}
        return {**self.sampling, **extra}


def read_generation_config(checkpoint_dir: Path | None, source: str = "auto"
                           ) -> GenerationConfig:
    """The EOS ids of ``checkpoint_dir``'s file, and the sampling of ``source``'s (``auto``: the
    same file; ``vllm``: none; else a folder's). ValueError naming the file for a value that is
    not JSON or out of range (only the EOS ids are read from a file whose sampling is not used),
    before any weights load."""
    own = _read(checkpoint_dir / FILE) if checkpoint_dir is not None else None
    eos = own.get("eos_token_id") if own is not None else None
    if source == "auto":
        path, raw = (checkpoint_dir / FILE if checkpoint_dir else None), own
    elif source == "vllm":
        path, raw = None, None
    else:
        path = Path(source) / FILE
        if not path.is_file():
            raise ValueError(f"generation_config {source!r} is neither 'auto', 'vllm' nor a "
                             f"folder holding {FILE}")
        raw = _read(path)
    if raw is None:
        return GenerationConfig(eos)
    return GenerationConfig(eos, *_sampling(raw, path))


def _read(path: Path) -> dict[str, Any] | None:
    """The file's fields, its EOS ids checked; None if there is no file."""
    if not path.is_file():
        return None
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    check_token_ids(raw.get("eos_token_id"), "eos_token_id", str(path), many=True)
    return raw


# transformers' own defaults: vLLM reads the file as transformers' ``to_diff_dict``, which drops
# a value equal to them (a file's "top_k": 50 is no recommendation); the other fields' defaults
# are the built-in ones already.
_TRANSFORMERS_DEFAULTS = {"top_k": 50}


def _sampling(raw: dict[str, Any], path: Path | None) -> tuple[dict[str, Any], int | None]:
    """(the sampling fields set, max_new_tokens), checked as SamplingParams checks them."""
    given = {k: raw[k] for k in SAMPLING_FIELDS
             if raw.get(k) is not None and raw[k] != _TRANSFORMERS_DEFAULTS.get(k)}
    max_new = raw.get("max_new_tokens")
    try:
        SamplingParams(**given, **({"max_tokens": max_new} if max_new is not None else {}))
    except (TypeError, ValueError) as e:  # (its message names the field first)
        raise ValueError(f"{path}: {str(e).replace('max_tokens', 'max_new_tokens', 1)}") from None
    return given, max_new
