"""Workload builders: ShareGPT reading, arrivals, distributions, multi-turn ShareGPT and synthetic
conversations, client/priority streams, the workloads.build CLI and the committed traces."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fairswitch.bench.trace import (Conversation, Trace, TraceError, Turn, read_trace,
                                    write_trace)
from fairswitch.config import SchedulerConfig
from workloads import arrivals, build, sharegpt, sharegpt_multiturn, streams
from workloads.dists import parse_dist
from workloads.synthetic import Shape, synthetic_conversations
from workloads.tokens import TURN_OVERHEAD_TOKENS, Limits, count_tokens, load_tokenizer


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


def test_conversations_from_a_file_json_or_json_lines_plain_or_compressed(tmp_path):
    import gzip
    import lzma

    convs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}]}
             for i in range(3)]
    lines = "".join(json.dumps(c) + "\n" for c in convs) + "\n"  # a blank line is skipped
    files = {"a.jsonl": lines.encode(), "a.json": json.dumps(convs).encode(),
             "a.jsonl.gz": gzip.compress(lines.encode()),
             "a.json.xz": lzma.compress(json.dumps(convs).encode())}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert list(sharegpt.iter_conversations(tmp_path / name)) == convs, name
    (tmp_path / "bom.JSON").write_bytes(b"\xef\xbb\xbf" + json.dumps(convs).encode())
    assert list(sharegpt.iter_conversations(tmp_path / "bom.JSON")) == convs


def test_a_bad_conversations_file_is_named_in_the_error(tmp_path):
    import gzip

    # a file of your own is checked, not read up to its first fault as the package's is
    bad = {
        "bad.jsonl": (b'{"id": "a", "conversations": []}\n{"id": \n',
                      r"bad.jsonl:2: not a JSON conversation"),
        "list.jsonl": (b"[1, 2]\n", r"list.jsonl:1: a conversation is a JSON object"),
        "bad.json": (b'[{"id": "a"}, {"id": oops}, {"id": "c"}]',
                     r"bad.json: not a JSON array of conversations"),
        "cut.json": (b'[{"id": "a"}, {"id": "b", "conversations": [', r"cut.json: not a JSON"),
        "nums.json": (b'[{"id": "a"}, 3]', r"nums.json: element 1: a conversation is a JSON"),
        "cut.jsonl.gz": (gzip.compress(b'{"id": "a"}\n' * 100)[:-20],
                         r"cut.jsonl.gz: cannot be read \(EOFError"),
        "plain.json.gz": (b"[]", r"plain.json.gz: cannot be read \(BadGzipFile"),
    }
    for name, (data, error) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=error):
            list(sharegpt.iter_conversations(tmp_path / name))
    with pytest.raises(ValueError, match=r"a.txt: a conversations file is .json"):
        sharegpt.iter_conversations(tmp_path / "a.txt")  # at once, not when first read


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


# --- multi-turn trace builders (workloads.build and its modules) ---------------------------------

TRACES = Path(__file__).resolve().parents[1] / "workloads" / "traces"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()[0]


def _context(conv: Conversation) -> int:
    return sum(t.input_tokens + t.output_tokens + TURN_OVERHEAD_TOKENS for t in conv.turns)


def _bare(n: int) -> list[Conversation]:
    return [Conversation(id=f"c{i}", arrival_s=0.0, turns=[Turn("u", 1), Turn("v", 1)])
            for i in range(n)]


def test_poisson_rate_and_gamma_cv_on_a_large_sample():
    rng = np.random.default_rng(1)
    t = arrivals.arrival_times(rng, 5.0, 200_000)
    assert np.all(np.diff(t) >= 0)
    assert len(t) / t[-1] == pytest.approx(5.0, rel=0.02)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.02)
    for cv in (0.5, 3.0):
        g = arrivals.gamma_gaps(rng, 5.0, cv, 400_000)
        assert 1 / g.mean() == pytest.approx(5.0, rel=0.02)
        assert g.std() / g.mean() == pytest.approx(cv, rel=0.05)


@pytest.mark.parametrize("rate,cv,match", [(0, 1, "rate"), (-2, 1, "rate"),
                                           (float("nan"), 1, "rate"), (1, 0, "cv"),
                                           (1, float("inf"), "cv")])
def test_arrival_arguments_are_validated(rate, cv, match):
    with pytest.raises(ValueError, match=match):
        arrivals.arrival_times(np.random.default_rng(0), rate, 10, cv)


def test_distribution_specs():
    rng = np.random.default_rng(0)
    assert set(parse_dist("uniform:2,4").sample_int(rng, 1000).tolist()) == {2, 3, 4}
    assert parse_dist("7").sample_int(rng, 3).tolist() == [7, 7, 7]
    assert parse_dist("exponential:4").sample(rng, 100_000).mean() == pytest.approx(4, rel=0.03)
    assert parse_dist("lognormal:100,1").sample_int(rng, 1000, 1, 300).max() <= 300
    # a sample past int64 is clipped to the top, not wrapped to the bottom
    assert parse_dist("fixed:1e19").sample_int(rng, 3, 1, 1024).tolist() == [1024] * 3
    assert parse_dist("fixed:1e19").sample_int(rng, 1).item() == 2 ** 62
    for bad in ("normal:1", "uniform:5,2", "lognormal:0,1", "fixed:x", "fixed:1,2", "fixed:-1"):
        with pytest.raises(ValueError, match="bad distribution"):
            parse_dist(bad)


def test_normalize_roles_and_merge():
    msgs = [{"from": "system", "value": "be nice"}, {"from": "gpt", "value": "hello!"},
            {"from": "human", "value": "a"}, {"from": "user", "value": "b"},
            {"from": "bing", "value": "   "}, {"from": "chatgpt", "value": "c"},
            {"from": "bard", "value": "d"}, {"from": "human", "value": ""},
            {"from": "Human", "value": "e"}, {"from": "assistant", "value": "f"},
            {"from": "human", "value": "unanswered"}]
    assert sharegpt_multiturn.normalize_messages(msgs) == [("a\n\nb", "c\n\nd"), ("e", "f")]
    assert sharegpt_multiturn.normalize_messages([{"from": "robot", "value": "x"}]) is None
    assert sharegpt_multiturn.normalize_messages([{"from": "gpt", "value": "x"}]) == []


def _fake_dataset(tmp_path, monkeypatch, convs):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs)[:-1] + ', {"id": "cut", "conversations": [{"fr')
    monkeypatch.setattr(sharegpt, "_open_dataset", lambda: open(path, "rb"))


def _msgs(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def test_sharegpt_builder_skips_what_does_not_qualify(tmp_path, monkeypatch, tok):
    _fake_dataset(tmp_path, monkeypatch, [
        {"id": "ok", "conversations": _msgs("hi there", "hello", "how are you", "fine")},
        {"id": "ok", "conversations": _msgs("dup", "dup")},
        {"id": "odd", "conversations": [{"from": "tool", "value": "x"}]},
        {"id": "empty", "conversations": _msgs("", "")},
        {"id": "one", "conversations": _msgs("just one", "turn")}])
    stats = Counter()
    convs = list(sharegpt_multiturn.iter_sharegpt_conversations(tok, Limits(min_turns=2), stats))
    assert [c.id for c in convs] == ["sharegpt-ok"]
    assert [(t.user, t.assistant) for t in convs[0].turns] == [("hi there", "hello"),
                                                               ("how are you", "fine")]
    assert [t.input_tokens for t in convs[0].turns] == count_tokens(tok, ["hi there",
                                                                          "how are you"])
    assert stats == {"scanned": 5, "bad_id": 1, "bad_role": 1, "too_few_turns": 2}


def test_history_clipping_respects_max_context(tmp_path, monkeypatch, tok):
    long = " ".join(["word"] * 300)
    _fake_dataset(tmp_path, monkeypatch,
                  [{"id": "long", "conversations": _msgs(*[long] * 12)}])
    limits = Limits(max_input_tokens=100, max_output_tokens=50, max_context=500, max_turns=8)
    (conv,) = sharegpt_multiturn.iter_sharegpt_conversations(tok, limits)
    assert len(conv.turns) == 500 // (100 + 50 + TURN_OVERHEAD_TOKENS)  # the earliest that fit
    assert _context(conv) <= 500
    for t in conv.turns:
        assert (t.input_tokens, t.output_tokens) == (100, 50)
        assert count_tokens(tok, [t.user, t.assistant]) == [100, 50]
    skip = Limits(max_input_tokens=100, max_output_tokens=50, max_context=500, trim=False)
    assert list(sharegpt_multiturn.iter_sharegpt_conversations(tok, skip)) == []


def test_real_sharegpt_conversations_are_whole_and_measured(tok):
    limits = Limits(min_turns=2)
    convs = list(itertools.islice(sharegpt_multiturn.iter_sharegpt_conversations(tok, limits), 30))
    assert len(convs) == 30
    for c in convs:
        assert 2 <= len(c.turns) <= limits.max_turns and _context(c) <= limits.max_context
        assert all(t.user.strip() and t.assistant.strip() for t in c.turns)
        t = c.turns[-1]
        assert count_tokens(tok, [t.user, t.assistant]) == [t.input_tokens, t.output_tokens]
        assert 1 <= t.output_tokens <= limits.max_output_tokens


def test_synthetic_text_is_measured_exactly(tok):
    shape = Shape(parse_dist("uniform:1,4"), parse_dist("lognormal:40,1"), parse_dist("fixed:9"))
    convs = synthetic_conversations(40, shape, Limits(64, 16, max_context=400),
                                    tok, seed=3)
    turns = [t for c in convs for t in c.turns]
    assert count_tokens(tok, [t.user for t in turns]) == [t.input_tokens for t in turns]
    assert {t.output_tokens for t in turns} == {9} and max(t.input_tokens for t in turns) <= 64
    assert all(_context(c) <= 400 for c in convs) and len({t.user for t in turns}) == len(turns)


def test_client_rate_and_priority_class_shares():
    timing = streams.Timing(rate=10, think=parse_dist("exponential:3"), client_rates=(4, 2, 1, 1),
                            priority_classes=streams.parse_priority_classes("0:0.2,1:0.8"))
    convs = streams.apply_timing(_bare(20_000), timing, seed=5)
    clients = Counter(c.client for c in convs)
    for i, share in enumerate((0.5, 0.25, 0.125, 0.125)):
        assert clients[streams.client_name(i)] / 20_000 == pytest.approx(share, abs=0.015)
    assert Counter(c.priority for c in convs)[0] / 20_000 == pytest.approx(0.2, abs=0.015)
    assert convs[0].arrival_s == 0
    assert len(convs) / convs[-1].arrival_s == pytest.approx(10, rel=0.03)
    assert all(c.turns[0].think_s == 0 for c in convs)
    assert np.mean([c.turns[1].think_s for c in convs]) == pytest.approx(3, rel=0.05)
    mine = [c.arrival_s for c in convs if c.client == "client-3"]
    assert len(mine) / (mine[-1] - mine[0]) == pytest.approx(10 / 8, rel=0.1)


@pytest.mark.parametrize("spec", ["0:0.5", "0:0.5,0:0.5", "0-1", "a:1", "0:1.5,1:-0.5"])
def test_bad_priority_classes(spec):
    with pytest.raises(ValueError, match="priority class"):
        streams.parse_priority_classes(spec)


def test_priority_updates_are_scheduler_config_fields():
    fields = streams.priority_update_config("random", 0.05, 3, 7, ((0, 0.5), (2, 0.5)))
    assert SchedulerConfig(**fields).policy == "trace"
    assert streams.priority_update_config("none", 0.05, 3, 7, ((0, 1.0),)) is None
    with pytest.raises(ValueError, match="outside"):
        streams.priority_update_config("markov", 0.05, 3, 7, ((0, 0.5), (3, 0.5)))
    with pytest.raises(ValueError, match="priority_update_prob"):
        streams.priority_update_config("markov", 2.0, 3, 7, ((0, 1.0),))


_SMALL = ["synthetic", "--num-conversations", "12", "--turns", "uniform:1,3", "--input-tokens",
          "uniform:5,30", "--output-tokens", "uniform:2,9", "--rate", "4", "--client-rates", "2,1"]


def test_same_seed_same_trace_other_seed_other_trace(tmp_path):
    paths = [tmp_path / f"{name}.jsonl.gz" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("1", "1", "2")):
        build.main([*_SMALL, "--seed", seed, "--output", str(path)])
    data = [p.read_bytes() for p in paths]
    assert data[0] != data[2]
    a, b = (read_trace(p) for p in paths[:2])
    assert a.conversations == b.conversations
    assert a.meta["command"].replace("a.jsonl", "b.jsonl") == b.meta["command"]


def test_cli_writes_a_readable_trace_with_meta(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    build.main([*_SMALL, "--seed", "4", "--output", str(out), "--priority-classes", "0:0.5,1:0.5",
                "--priority-updates", "markov"])
    trace = read_trace(out)
    meta = trace.meta
    assert meta["command"].startswith("python -m workloads.build synthetic") and meta["seed"] == 4
    assert meta["tokenizer"] == "cl100k_base" and meta["params"]["turns"] == "uniform:1,3"
    assert meta["counts"]["conversations"] == 12 == len(trace.conversations)
    assert meta["counts"]["requests"] == trace.num_requests
    assert SchedulerConfig(**meta["scheduler"]).priority_updates == "markov"
    assert f"12 conversations, {trace.num_requests} requests" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build.main([*_SMALL, "--rate", "0", "--output", str(out)])


@pytest.mark.parametrize("line,what", [
    ("{not json", "Expecting property name"),
    ('{"id": "x", "arrival_s": 1, "turns": [{"user": "u"}]}', "output_tokens"),
    ('{"id": "x", "arrival_s": 1, "turns": [{"user": "u", "output_tokens": -3}]}', "output_tokens"),
    ('{"id": "x", "turns": [{"user": "u", "output_tokens": 3}]}', "arrival_s"),
    ('{"id": "x", "arrival_s": 1%s, "turns": [{"user": "u", "output_tokens": 3}]}' % ("0" * 400),
     "arrival_s must be finite and >= 0, got an integer too large"),  # was an OverflowError
])
def test_read_trace_names_the_corrupt_line(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    write_trace(path, _bare(1), {"seed": 0})
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(TraceError, match=rf"bad\.jsonl:3: .*{what}"):
        read_trace(path)


def test_a_trace_meta_that_is_not_json_is_refused(tmp_path):
    """Python's NaN in the meta line used to pass, and the report that repeats the meta could
    not be written once the run had ended."""
    path = tmp_path / "meta.jsonl"
    write_trace(path, _bare(1))
    body = path.read_text()
    for meta, message in (("NaN", "NaN is not a JSON number"),
                          ("1e999", "1e999 is out of a float's range")):
        path.write_text(f'{{"trace_meta": {{"rate": {meta}}}}}\n' + body)
        with pytest.raises(TraceError, match=rf"meta\.jsonl:1: .*{message}"):
            read_trace(path)


@pytest.mark.parametrize("name,clients", [("sharegpt_multiturn.jsonl.gz", 1),
                                          ("clients_overload.jsonl.gz", 4), ("tiny.jsonl", 2)])
def test_committed_traces_parse(name, clients):
    trace: Trace = read_trace(TRACES / name)
    assert trace.meta["counts"]["requests"] == trace.num_requests
    assert trace.meta["command"].endswith(f"--output workloads/traces/{name} --seed 0")
    assert len({c.client for c in trace.conversations}) == clients
    assert all(_context(c) <= trace.meta["params"]["max_context"] for c in trace.conversations)
    assert (TRACES / name).stat().st_size < 2_000_000


@pytest.mark.parametrize("name", ["tiny.jsonl", "clients_overload.jsonl.gz"])
def test_committed_trace_is_what_its_recorded_command_builds(name, tmp_path, monkeypatch):
    """workloads/README.md: the same command gives the same bytes (trace_meta included, so its
    `tokenizer` names the tokenizer that measured the trace)."""
    import shlex

    command = read_trace(TRACES / name).meta["command"]
    argv = shlex.split(command)[3:]  # after "python -m workloads.build"
    (tmp_path / "workloads" / "traces").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the recorded --output is relative to the repository root
    build.main(argv)
    assert (tmp_path / "workloads" / "traces" / name).read_bytes() == (TRACES / name).read_bytes()
