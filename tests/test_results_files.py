"""The recorded benchmark results: every file in benchmarks/results/ is one JSON object in the
format the benchmarks write (device, ISO date, commit, command, figures, claims of name/value/
unit), and every results file or plot folder the README cites exists."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def test_there_are_results():
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_results_file_format(path):
    result = json.loads(path.read_text())
    assert isinstance(result, dict)
    assert {"device", "date", "commit", "command", "figures", "claims"} <= result.keys()
    assert isinstance(result["device"], str) and result["device"]
    datetime.fromisoformat(result["date"])
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]), result["commit"]
    assert result["command"].startswith("python3 benchmarks/")
    assert isinstance(result["figures"], dict)
    names = [c["name"] for c in result["claims"]]
    assert len(names) == len(set(names)), "a claim is recorded twice"
    for claim in result["claims"]:
        assert set(claim) == {"name", "value", "unit"}
        assert isinstance(claim["value"], (int, float)) and math.isfinite(claim["value"])
        assert isinstance(claim["unit"], str) and claim["unit"]


def test_readme_cites_only_recorded_files():
    readme = (ROOT / "README.md").read_text()
    cited = set(re.findall(r"`([\w\-*]+\.json|plots/[\w\-]+/)`", readme))
    assert "fastswitch_compare.json" in cited
    for name in cited:
        assert list(RESULTS.glob(name)), f"README cites {name}, not in benchmarks/results/"
