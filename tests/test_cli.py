"""The console script: generate with the embedded model, and a help that documents every option."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fairswitch.cli.main import build_parser, main
from fairswitch.config import _all_fields


def test_help_documents_every_option(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for name in _all_fields():
        assert "--" + name.replace("_", "-") in text, name
    for opt in ("--max-tokens", "--temperature", "--top-p", "--top-k", "--stop", "--ignore-eos",
                "--prompts-file", "--device", "--dtype", "--max-model-len", "--block-size",
                "--num-gpu-blocks", "--gpu-memory-utilization"):
        assert opt in text, opt



def test_cli_md_names_every_option_and_only_real_ones():
    """docs/cli.md lists every option of every command (a boolean pair by either spelling or
    `--[no-]x`), and names no option the commands do not have."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", doc))
    for stem in re.findall(r"--\[no-\]([a-z0-9-]+)", doc):
        named |= {"--" + stem, "--no-" + stem}
    parser = build_parser()
    real = {o for a in parser._actions for o in a.option_strings}
    for name, sub in parser._commands.items():  # type: ignore[attr-defined]
        for action in sub._actions:
            opts = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            real |= set(opts)
            assert not opts or set(opts) & named, (name, opts)
    assert named <= real, sorted(named - real)

def test_generate_json(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    rc = main(["generate", "Hello", "--prompts-file", str(prompts), "--max-tokens", "5",
               "--ignore-eos", "--json", "--no-progress", "--num-gpu-blocks", "256"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello", "first prompt", "second prompt"]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)


def test_generate_chat_replies_through_the_template(capsys):
    from fairswitch import LLM, SamplingParams

    rc = main(["generate", "--chat", "--json", "--no-progress", "--max-tokens", "12",
               "What is the capital of France?"])
    assert rc == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = LLM().chat(messages, SamplingParams(max_tokens=12, temperature=0.0),
                      use_tqdm=False)[0].outputs[0]
    assert line["token_ids"] == want.token_ids and line["text"] == want.text
    assert "France" in want.text  # the default model is trained: it answers in kind


def test_generate_chat_without_a_template_and_with_one(capsys, tmp_path, write_checkpoint):
    """A tokenizer without a chat template: generate --chat said "pass chat_template", which it
    had no option for; now it renders the plain-text template, as the server and LLM.chat do,
    and takes --chat-template."""
    ckpt = write_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    common = ["generate", "--model", str(ckpt), "--chat", "--no-progress", "--max-tokens", "2"]
    assert main([*common, "hi"]) == 0
    assert capsys.readouterr().out.startswith("> hi\n")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    from fairswitch import LLM, SamplingParams

    llm = LLM(model=str(ckpt))
    plain, own = (llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1),
                           use_tqdm=False, **kw)[0].prompt
                  for kw in ({}, {"chat_template": template.read_text()}))
    assert (plain, own) == ("User: hi\nAssistant:", "[hi]")
    assert main([*common, "--json", "--chat-template", str(template), "hi"]) == 0
    line = json.loads(capsys.readouterr().out)
    want = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2,
                    temperature=0.0), chat_template=template.read_text(), use_tqdm=False)
    assert line["token_ids"] == want[0].outputs[0].token_ids
    assert main(["generate", "--chat-template", str(template), "hi"]) == 2
    assert "--chat-template needs --chat" in capsys.readouterr().err
    assert main([*common, "--chat-template", "{% if %}", "hi"]) == 2
    assert "not a Jinja template" in capsys.readouterr().err


def test_generate_errors_are_clear(capsys):
    assert main(["generate", "--no-progress", "--max-tokens", "0", "hi"]) == 2
    assert "max_tokens must be at least 1" in capsys.readouterr().err
    assert main(["generate", "--model", "/no/such/dir", "hi"]) == 2
    assert "neither an existing directory" in capsys.readouterr().err
    assert main(["generate", "--max-waiting", "0", "hi"]) == 2  # (no request could ever run)
    assert "error: max_waiting must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--swap-space", "0", "--preemption-mode", "swap", "hi"]) == 2
    assert "error: preemption_mode 'swap' needs swap space" in capsys.readouterr().err
    assert main(["generate", "--no-enable-prefix-caching", "--cpu-kv-reuse", "hi"]) == 2
    assert "error: cpu_kv_reuse is the prefix cache's tier" in capsys.readouterr().err


@pytest.mark.parametrize("line", ['{"prompt": 5}', '{"prompt": ["a", "b"]}', '{"prompt": null}'])
def test_a_jsonl_prompt_must_be_a_string(capsys, tmp_path, line):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert main(["generate", "--prompts-file", str(prompts), "--no-progress"]) == 2
    assert "p.jsonl:2: \"prompt\" must be a string" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fairswitch", "generate", "Hello",
                          "--max-tokens", "4", "--no-progress"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello")


def test_parser_builds():
    assert build_parser().prog == "fairswitch"


def test_stop_token_ids_take_one_value_and_leave_the_prompt(tmp_path):
    """With nargs="*" the prompt after them was read as one more id ("invalid int value")."""
    from fairswitch.cli.generate import _read_prompts

    args = build_parser().parse_args(["generate", "--stop-token-ids", "5", "Hello",
                                      "--stop-token-ids", "7,8"])
    assert args.prompts == ["Hello"] and args.stop_token_ids == [5, 7, 8]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--stop-token-ids", "5,x", "Hello"])
    upper = tmp_path / "P.JSONL"  # read as JSONL whatever the case of its suffix
    upper.write_text('{"prompt": "fine"}\n')
    args.prompts_file = upper
    assert _read_prompts(args) == ["Hello", "fine"]
    # Lines end at newlines only: JSON writes U+2028 unescaped, a prompt may hold a form feed.
    upper.write_text('{"prompt": "a\u2028b"}\r\n{"prompt": "c\x85d"}\n', newline="")
    assert _read_prompts(args) == ["Hello", "a\u2028b", "c\x85d"]
    text = tmp_path / "p.txt"
    text.write_text("one\x0cpage\r\ntwo\rthree\n", newline="")  # (\r: a classic Mac's)
    args.prompts_file = text
    assert _read_prompts(args) == ["Hello", "one\x0cpage", "two", "three"]
