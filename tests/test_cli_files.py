"""The commands' files: a bad input or output path is one line naming the file (and the line,
where there is one), exit status 2, and it is refused before any replay runs."""

from __future__ import annotations

import gzip

import pytest

from fairswitch.bench.trace import Conversation, Turn, write_trace
from fairswitch.cli.main import main

NOT_UTF8 = b"caf\xe9\n"


@pytest.fixture()
def trace_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_trace(path, [Conversation("a", 0.0, [Turn("hello", output_tokens=2)])])
    return path


@pytest.fixture()
def no_replay(monkeypatch):
    """bench and replay fail the test if they get as far as replaying."""
    import fairswitch.cli.bench as cli_bench
    import fairswitch.cli.replay as cli_replay

    def replayed(*args, **kwargs):
        raise AssertionError("replayed before refusing its files")

    monkeypatch.setattr(cli_bench, "run_target", replayed)
    monkeypatch.setattr(cli_replay, "run_target", replayed)


def error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_prompts_file_errors_name_the_file(capsys, tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine\n" + NOT_UTF8)
    assert f"prompts file {bad}:2: not UTF-8 text" in error_of(
        capsys, ["generate", "--prompts-file", str(bad)])
    assert f"prompts file {tmp_path} is a directory" in error_of(
        capsys, ["generate", "--prompts-file", str(tmp_path)])
    assert "does not exist" in error_of(
        capsys, ["generate", "--prompts-file", str(tmp_path / "nope.txt")])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": ""}', '"prompt" is empty'),
    ('{"text": "hi"}', 'expected {"prompt": ...}, got {"text": "hi"}'),
    ('["hi"]', 'expected {"prompt": ...}'),
    ("{nope", "not JSON"),
])
def test_a_bad_jsonl_prompt_names_its_line(capsys, tmp_path, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    assert f"p.jsonl:3: {message}" in error_of(capsys, ["generate", "--prompts-file",
                                                          str(prompts)])


@pytest.mark.parametrize("command", ["bench", "replay"])
def test_trace_errors_name_the_file(capsys, tmp_path, no_replay, command):
    text = tmp_path / "t.jsonl"
    text.write_bytes(b'{"id": "a", "arrival_s": 0, "turns": [{"user": "x", "output_tokens": 1}]}\n'
                     + NOT_UTF8)
    fake_gz = tmp_path / "t.jsonl.gz"
    fake_gz.write_text("not gzip\n")
    cut_gz = tmp_path / "cut.jsonl.gz"
    cut_gz.write_bytes(gzip.compress(text.read_bytes())[:20])
    for trace, message in [(text, f"{text}:2: bad trace line: 'utf-8' codec can't decode"),
                           (fake_gz, f"{fake_gz}: not a valid gzip file"),
                           (cut_gz, f"{cut_gz}: not a valid gzip file"),
                           (tmp_path, f"trace {tmp_path} is a directory, not a file")]:
        assert message in error_of(capsys, [command, "--trace", str(trace)])


def test_chat_template_directory(capsys, trace_file, tmp_path):
    """(Read before the engine is built.)"""
    assert f"chat template file {tmp_path} is a directory" in error_of(
        capsys, ["replay", "--trace", str(trace_file), "--chat-template", str(tmp_path)])


def test_steps_input_errors_name_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"columns": "' + NOT_UTF8)
    assert f"{bad}: not a step log (not UTF-8 text" in error_of(capsys, ["steps", str(bad)])
    assert f"step log {tmp_path / 'nope.json'} does not exist" in error_of(
        capsys, ["steps", str(tmp_path / "nope.json")])
    assert f"step log {tmp_path} is a directory" in error_of(capsys, ["steps", str(tmp_path)])


@pytest.mark.parametrize("command", ["bench", "replay", "steps"])
def test_output_json_that_cannot_be_written_is_refused_first(capsys, trace_file, tmp_path,
                                                             no_replay, command):
    """These failed only after the whole run, a directory naming a temporary file."""
    argv = ["steps", str(trace_file)] if command == "steps" else [command, "--trace",
                                                                   str(trace_file)]
    assert f"--output-json {tmp_path} is a directory, not a file" in error_of(
        capsys, [*argv, "--output-json", str(tmp_path)])
    under_a_file = trace_file / "out" / "report.json"
    assert f"--output-json {under_a_file} cannot be written: {trace_file} is not a directory" \
        in error_of(capsys, [*argv, "--output-json", str(under_a_file)])


@pytest.mark.parametrize("command", ["bench", "replay"])
def test_step_log_and_plots_dirs_that_cannot_be_made_are_refused_first(capsys, trace_file,
                                                                        no_replay, command):
    assert f"--step-log {trace_file} is not a directory" in error_of(
        capsys, [command, "--trace", str(trace_file), "--step-log", str(trace_file)])
    if command == "bench":
        pytest.importorskip("matplotlib")
        assert f"--plots-dir {trace_file} is not a directory" in error_of(
            capsys, [command, "--trace", str(trace_file), "--plots-dir", str(trace_file)])


def test_a_missing_output_folder_is_made(tmp_path):
    from fairswitch.cli.files import check_writable

    check_writable(tmp_path / "a" / "b" / "report.json", "--output-json")
    check_writable(tmp_path / "steps", "--step-log", directory=True)
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "steps").is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "steps"]  # no probe left


def test_write_json_onto_a_directory_names_it(tmp_path):
    from fairswitch.bench.report import write_json

    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        write_json(tmp_path, {})


def test_replay_refuses_bad_client_weights_before_the_replay(capsys, trace_file, no_replay):
    assert "client weight of 'a' must be a number, got 'x'" in error_of(
        capsys, ["replay", "--trace", str(trace_file), "--url", "http://127.0.0.1:9",
                 "--client-weights", "a=x"])
