"""The recorded benchmark results: every file in benchmarks/results/ is one JSON object in the
format the benchmarks write (device, ISO date, commit, command, figures, claims of name/value/
unit). That the README and docs/ cite exactly the recorded files: test_results_cited.py."""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))


# Runs whose --commit was typed by hand as a full hash with a wrong tail: the run was at the
# commit the first seven characters name (2b9c8f2 "VTC: a queued client preempts only once ..."). Kept because
# results files are never edited by hand; results_io now records a short --commit as given and
# expands it where git is at hand, so no new file should need this.
MISTYPED_COMMIT = {f"fastswitch_{name}.json" for name in (
    "compare_random", "sweep60_markov_p01", "sweep60_markov_p05",
    "sweep60_random_p01", "sweep60_random_p05")}


def _full_history() -> bool:
    """A git checkout with its whole history (not shallow): every recorded commit is in it."""
    try:
        out = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "false"


def test_there_are_results():
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_results_file_format(path):
    result = json.loads(path.read_text())
    assert isinstance(result, dict)
    assert {"device", "date", "commit", "command", "figures", "claims"} <= result.keys()
    assert isinstance(result["device"], str) and result["device"]
    datetime.fromisoformat(result["date"])
    commit = result["commit"]
    assert re.fullmatch(r"[0-9a-f]{7,40}", commit), commit  # full or abbreviated hash
    if _full_history():
        ref = commit[:7] if path.name in MISTYPED_COMMIT else commit
        found = subprocess.run(["git", "cat-file", "-e", f"{ref}^{{commit}}"], cwd=ROOT,
                               capture_output=True, timeout=10)
        assert found.returncode == 0, f"commit {commit} is not in this repository"
    # A script of the repository (train_tiny.json's, run as a module, records its absolute path).
    assert re.match(r"python3 (benchmarks/|-m (benchmarks|workloads)\.|\S*/workloads/\w+\.py )",
                    result["command"]), result["command"]
    assert isinstance(result["figures"], dict)
    names = [c["name"] for c in result["claims"]]
    assert len(names) == len(set(names)), "a claim is recorded twice"
    for claim in result["claims"]:
        assert set(claim) == {"name", "value", "unit"}
        assert isinstance(claim["value"], (int, float)) and math.isfinite(claim["value"])
        assert isinstance(claim["unit"], str) and claim["unit"]


def test_a_given_commit_is_recorded_in_full(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from results_io import git_commit, resolve_commit

    head = git_commit()
    if head == "unknown":
        pytest.skip("no git checkout")
    assert resolve_commit(head[:7]) == head and resolve_commit(None) == head
    assert "warning" not in capsys.readouterr().err
    assert resolve_commit("0" * 40) == "0" * 40  # unknown: as given, with a warning
    assert "names no commit" in capsys.readouterr().err


def test_command_line_is_pastable_from_the_repository_root(monkeypatch):
    import sys
    import types

    from benchmarks.results_io import command_line

    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "x.py"), "--a", "b c"])
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None))
    assert command_line() == "python3 benchmarks/x.py --a 'b c'"
    module = types.SimpleNamespace(__spec__=types.SimpleNamespace(name="workloads.train_tiny"))
    monkeypatch.setitem(sys.modules, "__main__", module)
    assert command_line() == "python3 -m workloads.train_tiny --a 'b c'"
