"""``fairswitch run-batch``: an OpenAI batch file answered offline by the server's own code."""

from __future__ import annotations

import json

from fairswitch.cli.main import main
from fairswitch.cli.run_batch import parse_line

ENGINE = ["--num-gpu-blocks", "64", "--max-model-len", "128"]
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.0}


def test_each_line_is_answered_in_order_as_the_server_answers_it(tmp_path, capsys):
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": CHAT},
        {"custom_id": "text", "url": "/v1/completions",
         "body": {"prompt": "Once", "max_tokens": 3, "ignore_eos": True}},
        {"custom_id": "refused", "url": "/v1/completions", "body": {"prompt": "x",
                                                                    "max_tokens": -1}},
        "not json",
        {"custom_id": "get", "method": "GET", "url": "/v1/models"},
        {"custom_id": "resp", "url": "/v1/responses", "body": {"input": "Hi",
                                                              "max_output_tokens": 4}},
        {"custom_id": "stream", "url": "/v1/chat/completions", "body": {**CHAT, "stream": True}},
        {"custom_id": "again", "url": "/v1/chat/completions", "body": CHAT},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n\n"
                             for x in lines))  # (blank lines are no requests)
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(batch), "-o", str(out), "--max-concurrency", "2",
                 *ENGINE]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [
        "chat", "text", "refused", None, "get", "resp", "stream", "again"]
    status = [r["response"] and r["response"]["status_code"] for r in results]
    assert status == [200, 200, 400, None, None, 200, None, 200]
    chat, text, refused, bad, get, resp, stream, again = results
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert chat["response"]["request_id"] == chat["response"]["body"]["id"]
    assert text["response"]["body"]["usage"]["completion_tokens"] == 3
    assert "'max_tokens' must be at least 1" in refused["response"]["body"]["error"]["message"]
    assert "not JSON" in bad["error"]["message"] and "'method'" in get["error"]["message"]
    assert resp["response"]["body"]["object"] == "response"
    assert "'stream' is not available" in stream["error"]["message"]
    # Greedy: the same request, the same reply.
    assert (again["response"]["body"]["choices"][0]["message"]
            == chat["response"]["body"]["choices"][0]["message"])
    assert len({r["id"] for r in results}) == len(results)
    assert "8 requests, 4 answered, 4 refused" in capsys.readouterr().err


def test_what_is_not_a_request_says_why():
    assert parse_line('{"url": "/v1/embeddings", "body": {}}', 1).error.startswith(
        "'url' must be one of /v1/chat/completions")
    assert parse_line('{"url": "/v1/completions", "body": [1]}', 1).error == (
        "'body' must be a JSON object (the request)")
    assert parse_line("[1]", 3).error == "line 3 must be a JSON object"
    line = parse_line('{"custom_id": 7, "url": "/v1/completions", "body": {"prompt": "x"}}', 1)
    assert line.error is None and line.custom_id == 7


def test_odd_text_a_full_queue_and_a_lone_surrogate_lose_no_request(tmp_path, capsys):
    """A prompt holding U+2028 (a line break to str.splitlines, not to JSONL) is one request;
    with --max-waiting below the default concurrency no request comes back 503; a custom_id
    with a lone surrogate is written escaped (the whole file was lost)."""
    body = {"prompt": "a\u2028b\u0085c", "max_tokens": 4, "ignore_eos": True}
    lines = [{"custom_id": f"r{i}", "url": "/v1/completions", "body": body} for i in range(6)]
    lines.append({"custom_id": "bad\ud800", "url": "/v1/completions", "body": body})
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines[:-1])
                     + json.dumps(lines[-1]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(batch), "-o", str(out), "--log-level", "warning",
                 "--max-num-seqs", "2", "--max-waiting", "1", *ENGINE]) == 0
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")
               if line]
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(6)] + ["bad\ud800"]
    assert [r["response"]["status_code"] for r in results] == [200] * 7
    assert "7 requests, 7 answered" in capsys.readouterr().err
