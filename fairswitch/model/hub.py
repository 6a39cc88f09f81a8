"""Models named by their Hugging Face Hub repository (``Qwen/Qwen2.5-7B-Instruct``), as vLLM
takes them: the files fairswitch reads are fetched into the Hub's cache (``HF_HOME``, or
``download_dir``) once, and found there after; ``HF_TOKEN`` reaches gated repositories and
``HF_HUB_OFFLINE=1`` uses the cache alone.
"""

from __future__ import annotations

import re
from pathlib import Path

# What a checkpoint directory is read for: config, generation config, tokenizer, chat template.
_CONFIG_FILES = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
# Files of the same names that are never read: subfolders (original/, onnx/...) and Mistral's
# consolidated weights (a second copy of the model in its own format).
_NOT_READ = ["*/*", "consolidated*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo_id(name: str) -> bool:
    """``owner/name``, as Hub repositories are named (a path that exists is checked first)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def snapshot(repo_id: str, revision: str | None = None, download_dir: str | None = None,
             weights: bool = True) -> Path:
    """The local directory of ``repo_id`` at ``revision`` (default: its main branch), with
    its safetensors weights where ``weights``. FileNotFoundError naming the repository and the
    Hub's answer if it cannot be had (unknown, gated, offline and not cached...)."""
    from huggingface_hub import snapshot_download

    patterns = _CONFIG_FILES + (["*.safetensors", "*.safetensors.index.json"] if weights else [])
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                 allow_patterns=patterns, ignore_patterns=_NOT_READ)
    except Exception as e:  # noqa: BLE001 - the Hub's errors are many; each is this one
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"model {repo_id!r} is no local directory or known name, and the Hugging Face Hub "
            f"repository of that name{at} could not be fetched: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return Path(path)
