"""The embedded default model, ``fairswitch-tiny``: a small Llama trained on ShareGPT conversations.

It ships inside the package as an ordinary Hugging Face checkpoint directory (``fairswitch-tiny/``
beside this file: config.json, model.safetensors in bf16, tokenizer.json with its ChatML special
tokens and chat template, generation_config.json), so every path that loads a user's checkpoint
loads it too, with no build step at first use. It was trained once, on one H200, by
``workloads/train_tiny.py`` (``benchmarks/results/train_tiny.json`` records the command, the commit
and the validation loss); retraining with the same command writes the same kind of directory.

Shape: 6 layers, hidden 384, GQA 6/2 heads of 64, SwiGLU 1024, tied embeddings, a 12288-token
byte-level BPE vocabulary of its own (``<|endoftext|>`` = 0 ends a text, ``<|im_start|>`` = 1 and
``<|im_end|>`` = 2 frame chat turns; generation stops on 0 and 2): 14.2M parameters, 28 MB.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "fairswitch-tiny"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_LFS_POINTER = b"version https://git-lfs"


def is_default_model_name(name: str) -> bool:
    """Whether a user-supplied model name means the embedded default model."""
    return name.strip().lower() == DEFAULT_MODEL_NAME


def default_model_dir() -> Path:
    """The checkpoint directory of ``fairswitch-tiny``; FileNotFoundError naming what is missing
    if the installation lacks it (a package built without its data files, a pointer file left by
    a checkout without Git LFS)."""
    for name in _FILES:
        path = DEFAULT_MODEL_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"the default model's {name} is missing from {DEFAULT_MODEL_DIR}: "
                                    "reinstall fairswitch, or pass --model DIR")
        if name == "model.safetensors":
            with open(path, "rb") as f:
                if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                    raise FileNotFoundError(f"{path} is a Git LFS pointer, not the weights: "
                                            "run `git lfs pull`, or pass --model DIR")
    return DEFAULT_MODEL_DIR
