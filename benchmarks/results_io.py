"""Recording benchmark results: one JSON object per run, with what is needed to trust a number.

Every file written here says where it was measured (``device``), when (``date``, UTC), on which code
(``commit``) and how to reproduce it (``command``), next to the raw ``figures`` and the ``claims``
(named values with units) that READMEs and reports may quote.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def command_line() -> str:
    """The command that started this process, as one pastable shell line."""
    return shlex.join(["python3", *sys.argv])


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
        "commit": commit or git_commit(),
        "command": command,
        "figures": figures,
        "claims": [{"name": c["name"], "value": c["value"], "unit": c["unit"]} for c in claims],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result
