"""Recording benchmark results: one JSON object per run, with what is needed to trust a number.

Every file written here says where it was measured (``device``), when (``date``, UTC), on which code
(``commit``) and how to reproduce it (``command``), next to the raw ``figures`` and the ``claims``
(named values with units) that READMEs and reports may quote.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


_ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """The command that started this process, as one pastable shell line from the repository
    root: ``python3 -m package.module ...`` when run as a module, a script inside the repository
    by its path from the root."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        head = ["-m", spec.name.removesuffix(".__main__")]
    else:
        script = Path(sys.argv[0]).resolve()
        head = [str(script.relative_to(_ROOT)) if script.is_relative_to(_ROOT) else sys.argv[0]]
    return shlex.join(["python3", *head, *sys.argv[1:]])


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}"


def git_commit() -> str:
    # Run from the repository of this file, not the caller's cwd, which may be anywhere.
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def resolve_commit(commit: str | None) -> str:
    """The commit to record: HEAD when none is given; a given one (full or abbreviated hash)
    expanded to its full hash where this checkout's git knows it, else recorded as given (the
    device machine has no git) with a warning if it is no hash or git here does not know it.
    Never raises: this runs when the measurement is done (tests/test_results_files.py checks
    every recorded commit against the repository)."""
    if commit is None:
        return git_commit()
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                             cwd=here, capture_output=True, text=True, timeout=10)
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        inside = top.returncode == 0 and Path(top.stdout.strip()) == here.parent
    except (OSError, subprocess.SubprocessError):
        out, inside = None, False
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    if inside or not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        print(f"warning: --commit {commit!r} names no commit of this repository; recorded as "
              "given", file=sys.stderr)
    return commit


def check_output(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Refuse, before a run, an ``--output`` that ``write_results`` could not write after it
    (a directory, a read-only folder), as ``parser``'s usage error: a long run is not lost to a
    typo."""
    from fairswitch.cli.files import check_writable

    try:
        check_writable(Path(path), "--output")
    except OSError as e:
        parser.error(str(e))


def write_results(path: str | Path, *, command: str, figures: dict[str, Any],
                  claims: list[dict[str, Any]], commit: str | None = None) -> dict[str, Any]:
    """Write one result object to ``path`` (parents created), say so, and return it."""
    for claim in claims:
        missing = {"name", "value", "unit"} - claim.keys()
        if missing:
            raise ValueError(f"claim {claim!r} lacks {sorted(missing)}")
    result = {
        "device": device_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": resolve_commit(commit),
        "command": command,
        "figures": figures,
        "claims": [{"name": c["name"], "value": c["value"], "unit": c["unit"]} for c in claims],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result
