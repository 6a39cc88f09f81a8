"""The commands' input and output files, checked before any work starts: a bad path is one line
naming what it was given as and the path itself, not a traceback, and not after a long run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fairswitch.model.tokenizer import template_syntax_error


def check_input_file(path: Path, what: str) -> Path:
    """``path`` if it can be opened for reading as a file; ``what`` names it in the error."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of the file ``what``."""
    data = check_input_file(path, what).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{what} {path}:{line}: not UTF-8 text ({e.reason}, byte "
                         f"{data[e.start]:#04x})") from e


def check_writable(path: Path, option: str, *, directory: bool = False) -> None:
    """Refuse now what writing ``path`` (a file, or with ``directory`` a folder to write files
    in) after the run would: a directory in place of the file or a file in place of the folder,
    a folder that cannot be made or written in. Makes the folder, as the writers would."""
    folder = path if directory else path.parent
    if directory and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is not a directory")
    if not directory and path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory, not a file")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{option} {path} is not writable")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {path} cannot be written: {existing} is not a "
                                 "directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # write access, a read-only file system
            pass
    except OSError as e:
        raise OSError(f"{option} {path} cannot be written: {e.strerror or e}") from e


def read_chat_template(value: str | None) -> str | None:
    """The --chat-template value: a file's text, or the template itself; refused here if it is
    not Jinja (else every chat request would fail, each as if the client had erred)."""
    if value is None:
        return None
    text = value if "{" in value else read_text(Path(value), "chat template file")
    if (error := template_syntax_error(text)) is not None:
        raise ValueError(f"--chat-template is not a Jinja template: {error}")
    return text
