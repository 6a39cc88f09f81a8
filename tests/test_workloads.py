"""ShareGPT reading: the truncated packaged file parses into whole conversations; traces round-trip."""

from __future__ import annotations

import itertools

import pytest

from workloads import sharegpt


def test_truncated_sharegpt_file_yields_whole_conversations():
    convs = list(itertools.islice(sharegpt.iter_conversations(), 200))
    assert len(convs) == 200
    for c in convs:
        assert isinstance(c["conversations"], list)
        assert all({"from", "value"} <= set(t) for t in c["conversations"])


def test_parser_stops_cleanly_at_a_truncated_tail(tmp_path, monkeypatch):
    text = '[{"id": "a", "conversations": []}, {"id": "b", "conversations": [{"from": "hu'
    path = tmp_path / "cut.json"
    path.write_text(text)
    monkeypatch.setattr(sharegpt, "_open_dataset", lambda: open(path, "rb"))
    assert [c["id"] for c in sharegpt.iter_conversations()] == ["a"]


def test_pairs_trace_roundtrip_and_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    assert sharegpt.write_pairs_trace(path, 5) == 5
    pairs = sharegpt.read_pairs_trace(path)
    assert len(pairs) == 5 and all(p and o for p, o in pairs)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:6: bad trace line"):
        sharegpt.read_pairs_trace(path)


def test_committed_trace_is_readable():
    pairs = sharegpt.read_pairs_trace()
    assert len(pairs) >= 1000
