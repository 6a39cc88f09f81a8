"""`fairswitch serve` as a real process: it starts, answers the openai client, and on SIGTERM
stops accepting, ends the in-flight stream after its grace period (an in-band error, then
[DONE]) and exits cleanly. tests/test_server_hardening.py times the whole sequence."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import openai
import pytest

from fairswitch.cli.main import main


def test_serve_help_lists_server_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for opt in ("--host", "--port", "--api-key", "--served-model-name", "--max-body-bytes",
                "--chat-template", "--shutdown-timeout", "--model", "--max-num-seqs",
                "--num-gpu-blocks", "--max-waiting"):
        assert opt in text, opt


@pytest.mark.parametrize("options, message", [
    (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number of seconds >= 0"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a finite number of seconds >= 0"),
    (["--chat-template", "{% for m in messages %}"], "--chat-template is not a Jinja template"),
    (["--ssl-certfile", "/no/such.pem"], "--ssl-certfile '/no/such.pem': cannot load"),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile, --ssl-ca-certs and --ssl-cert-reqs need"),
    (["--ssl-certfile", "c.pem", "--ssl-cert-reqs", "2"], "--ssl-cert-reqs 1 or 2 needs"),
])
def test_serve_refuses_bad_server_options_before_building_the_engine(capsys, monkeypatch,
                                                                     options, message):
    """A NaN timeout never ended a drain; a template that does not parse failed every chat
    request as the client's error (400)."""
    from fairswitch.engine.async_engine import AsyncEngine

    def no_engine(*args, **kwargs):
        raise AssertionError("built an engine before refusing the options")

    monkeypatch.setattr(AsyncEngine, "from_config", no_engine)
    assert main(["serve", *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, model", [
    (["serve", "llama-3-8b"], "llama-3-8b"), (["serve", "--model", "llama-3-8b"], "llama-3-8b"),
    (["serve", "llama-3-8b", "--model", "llama-3-8b"], "llama-3-8b"),
    (["serve"], "fairswitch-tiny")])
def test_serve_takes_the_model_as_vllm_serve_does(monkeypatch, argv, model):
    """`vllm serve MODEL`: launch scripts give the model first, without --model (it stopped
    the server at 'unrecognized arguments')."""
    from fairswitch.engine.async_engine import AsyncEngine

    seen = []

    def capture(config):
        seen.append(config.model.model)
        raise RuntimeError("captured")

    monkeypatch.setattr(AsyncEngine, "from_config", capture)
    with pytest.raises(RuntimeError, match="captured"):
        main(argv)
    assert seen == [model]


def test_serve_takes_vllm_command_lines(monkeypatch, capsys):
    """What launch scripts written for vLLM pass: --trust-remote-code, --enable-chunked-prefill,
    --dtype half / float, --kv-cache-dtype fp8_e4m3 (each stopped the server at 'unrecognized
    arguments' or 'invalid choice'); turning chunked prefill off is refused, saying why."""
    from fairswitch.engine.async_engine import AsyncEngine

    seen = []

    def capture(config):
        seen.append((config.model.dtype, config.cache.kv_cache_dtype))
        raise RuntimeError("captured")

    monkeypatch.setattr(AsyncEngine, "from_config", capture)
    for dtype, want in (("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")):
        with pytest.raises(RuntimeError, match="captured"):
            main(["serve", "llama-3-8b", "--trust-remote-code", "--enable-chunked-prefill",
                  "--dtype", dtype, "--kv-cache-dtype", "fp8_e4m3", "--disable-log-stats"])
        assert seen[-1] == (want, "fp8")
    assert main(["serve", "--no-enable-chunked-prefill"]) == 2
    assert "enable_chunked_prefill cannot be turned off" in capsys.readouterr().err


def test_serve_refuses_two_different_models(capsys, monkeypatch):
    from fairswitch.engine.async_engine import AsyncEngine

    monkeypatch.setattr(AsyncEngine, "from_config", lambda config: 1 / 0)
    assert main(["serve", "llama-3-8b", "--model", "qwen2.5-7b"]) == 2
    assert "the model is given twice" in capsys.readouterr().err


def test_templates_with_transformers_statements_are_taken():
    from fairswitch.cli.files import read_chat_template

    template = ("{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}"
                "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    assert read_chat_template(template) == template


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def test_serve_process_and_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairswitch.cli.main", "serve", "fairswitch-tiny", "--port", "0",
         "--api-key", "k",
         "--served-model-name", "tiny", "--num-gpu-blocks", "128", "--max-model-len", "256",
         "--shutdown-timeout", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        line = lines.get(timeout=180)
        assert line and line.startswith("fairswitch serve: tiny on http://127.0.0.1:"), \
            (line, proc.stderr.read() if line is None else "")
        url = line.rsplit(" ", 1)[1].strip()

        with openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60) as c:
            out = c.chat.completions.create(model="tiny", max_tokens=3,
                                            messages=[{"role": "user", "content": "hi"}])
            assert out.usage.completion_tokens <= 3 and out.model == "tiny"

        async def stream_then_sigterm() -> tuple[str, float]:
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
                async with s.post(f"{url}/v1/completions", json={
                        "prompt": "long", "max_tokens": 250, "ignore_eos": True,
                        "stream": True}) as r:
                    assert r.status == 200
                    await r.content.readline()
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    try:
                        body = (await r.content.read()).decode()
                    except aiohttp.ClientPayloadError:  # cut mid-chunk
                        body = ""
                    return body, time.monotonic() - t0
        body, waited = asyncio.run(stream_then_sigterm())
        # The stream was aborted after the 0.2 s grace period, long before its 250 tokens.
        assert body.endswith("data: [DONE]\n\n") and "shutting down" in body and waited < 20
        assert proc.wait(timeout=60) == 0
        rest = []
        while (line := lines.get(timeout=10)) is not None:
            rest.append(line)
        assert "fairswitch serve: stopped\n" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _self_signed(tmp_path):
    """A certificate for localhost and its key (openssl), as PEM files."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_serve_over_tls_on_a_unix_socket(tmp_path):
    """vLLM's --ssl-certfile/--ssl-keyfile (HTTPS), --ssl-ca-certs with --ssl-cert-reqs 2
    (client certificates required) and --uds (a Unix socket instead of a TCP port), together:
    a client that trusts the certificate and shows its own gets its reply through the socket;
    one without a certificate, or plain HTTP, is refused."""
    import ssl

    cert, key = _self_signed(tmp_path)
    sock = tmp_path / "fs.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairswitch.cli.main", "serve", "--uds", str(sock),
         "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(cert),
         "--ssl-cert-reqs", "2", "--num-gpu-blocks", "128",
         "--max-model-len", "256", "--shutdown-timeout", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()

    async def ask(tls: ssl.SSLContext | None) -> tuple[int, str]:
        """One request by hand (aiohttp's Unix connector speaks no TLS)."""
        body = b'{"prompt": "Hi", "max_tokens": 3}'
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(sock), ssl=tls, server_hostname="localhost" if tls else None)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                         b"application/json\r\nConnection: close\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            reply = (await reader.read()).decode()
            writer.close()
        except OSError:  # (refused: the handshake, or the connection reset; SSLError too)
            reply = ""
        return int(reply.split(" ", 2)[1]) if reply else 0, reply
    try:
        line = lines.get(timeout=180)
        assert line == f"fairswitch serve: fairswitch-tiny on unix:{sock}\n", \
            (line, proc.stderr.read() if line is None else "")
        trusting = ssl.create_default_context(cafile=str(cert))
        status, _ = asyncio.run(ask(trusting))  # (no client certificate: refused)
        assert status == 0
        trusting.load_cert_chain(str(cert), str(key))  # (signed by the CA it was given)
        status, body = asyncio.run(ask(trusting))
        assert status == 200 and '"completion_tokens":3' in body.replace(" ", ""), body
        status, _ = asyncio.run(ask(None))  # (plain HTTP: no reply)
        assert status == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_app_cleanup_cuts_streams_and_shuts_the_engine_down():
    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64,
                                                              max_model_len=256))
    server = BackgroundServer(build_app(engine), shutdown_timeout=0.2).start()

    async def stream_then_stop() -> str:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/completions", json={
                    "prompt": "long", "max_tokens": 250, "ignore_eos": True, "stream": True}) as r:
                await r.content.readline()
                await asyncio.to_thread(server.stop)
                try:
                    return (await r.content.read()).decode()
                except aiohttp.ClientPayloadError:
                    return ""
    try:
        body = asyncio.run(stream_then_stop())
        assert body.endswith("data: [DONE]\n\n") and "shutting down" in body
        assert not engine.is_running  # the app owned the engine: its cleanup stopped it
    finally:
        server.stop()
        engine.shutdown()


def test_a_bad_metrics_prefix_is_refused(capsys, monkeypatch):
    from fairswitch.engine.async_engine import AsyncEngine

    monkeypatch.setattr(AsyncEngine, "from_config", lambda config: 1 / 0)
    assert main(["serve", "--metrics-prefix", "vllm"]) == 2
    assert "metrics_prefix must be a Prometheus name ending in ':'" in capsys.readouterr().err


def test_the_stats_line_is_logged_while_there_is_work_and_once_when_it_stops(caplog):
    """vLLM's periodic stats line: throughput, queues, KV usage, prefix cache hits; an idle
    server says so once, then is quiet; ``--disable-log-stats`` (None) logs none."""
    import logging
    import re

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=256,
                                                              max_model_len=256))

    async def ask(url: str) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # (the second reuses the first's prompt KV)
                async with s.post(url, json={"prompt": "Hello there " * 8, "max_tokens": 40,
                                             "ignore_eos": True}) as r:
                    assert r.status == 200, await r.text()

    caplog.set_level(logging.INFO, logger="fairswitch.server.stats")
    try:
        for interval in (0.1, None):
            caplog.clear()
            settings = ServerSettings(log_stats_interval_s=interval)
            with BackgroundServer(build_app(engine, settings, shutdown_engine=False)) as srv:
                asyncio.run(ask(f"{srv.url}/v1/completions"))
                time.sleep(1.0)  # (ten intervals)
            lines = [r.getMessage() for r in caplog.records
                     if r.name == "fairswitch.server.stats"]
            if interval is None:
                assert not lines
                continue
            rates = [float(re.search(r"generation throughput: ([\d.]+)", line)[1])
                     for line in lines]
            assert any(rate > 0 for rate in rates), lines
            last_busy = max(i for i, rate in enumerate(rates) if rate > 0)
            assert len(lines) == last_busy + 2, lines  # one idle line after the work, no more
            assert "Running: 0 reqs, Waiting: 0 reqs, Swapped: 0 reqs" in lines[-1]
            assert all("Prefix cache hit rate: " in line for line in lines)
    finally:
        engine.shutdown()


def test_sagemaker_routes_ping_and_invocations():
    """SageMaker's /ping (no API key, as /health) and /invocations, routed by the body's fields
    as vLLM's: a chat, a completion, embeddings; a body of no known kind is a 400."""
    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=128,
                                                              max_model_len=256))

    async def ask(url: str) -> list:
        out = []
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
            async with aiohttp.ClientSession() as anonymous:
                for method in ("GET", "POST"):
                    async with anonymous.request(method, url + "/ping") as r:
                        out.append(r.status)
            for body in ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                         {"prompt": "Hi", "max_tokens": 2}, {"input": "Hi"}, {"other": 1}):
                async with s.post(url + "/invocations", json=body) as r:
                    out.append((r.status, await r.json()))
        return out
    try:
        with BackgroundServer(build_app(engine, ServerSettings(api_key="k"),
                                        shutdown_engine=False)) as srv:
            (get, post, (s1, chat), (s2, completion), (s3, embedded), (s4, bad)) = \
                asyncio.run(ask(srv.url))
    finally:
        engine.shutdown()
    assert (get, post, s1, s2, s3, s4) == (200, 200, 200, 200, 200, 400)
    assert chat["object"] == "chat.completion" and completion["object"] == "text_completion"
    assert embedded["data"][0]["object"] == "embedding"
    assert "/invocations takes a chat" in bad["error"]["message"]
