"""``python -m guardrails serve`` as an operator runs it: a real process, a real port, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the server tests drive the official client: pip install openai")
pytest.importorskip("uvicorn", reason="the server needs FastAPI and uvicorn: pip install -e '.[serve]'")
import httpx2 as httpx  # noqa: E402  (the HTTP client the openai package itself uses)

TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "guardrails", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("serve did not answer /health in time")


def test_serve_answers_and_sigterm_lets_the_request_in_flight_finish():
    proc, url = serve("--model", "tiny:qwen2", "--defenses", "system_prompt", "--no-moderation", "--api-key", "k")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in client.models.list()] == ["tiny:qwen2"]
        health = httpx.get(url + "/health").json()
        assert health["defenses"] == ["SafetySystemPrompt"] and health["moderation"] is None

        box: dict = {}

        def long_request() -> None:
            # the tiny models never emit EOS (guardrails.testing), so a whole answer has exactly max_tokens tokens
            box["r"] = client.chat.completions.create(model="tiny:qwen2", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=480, temperature=0)
            box["t"] = time.monotonic()

        t = threading.Thread(target=long_request)
        t.start()
        end = time.monotonic() + TIMEOUT
        while httpx.get(url + "/health").json()["running"] != 1:  # the request is being answered
            assert time.monotonic() < end and t.is_alive(), "the request never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        t.join(TIMEOUT)
        r, t_answer = box["r"], box["t"]
        assert t_answer > t_signal, "the request finished before SIGTERM: make it longer so the test means something"
        assert r.usage.completion_tokens == 480 and r.choices[0].finish_reason == "length"
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status says SIGTERM
        assert proc.wait(TIMEOUT) in (0, -signal.SIGTERM)
        out = proc.stdout.read() if proc.stdout else ""
        assert "serving tiny:qwen2" in out and "Finished server process" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "tiny:qwen2", "--defenses", "no_such_defense"], "unknown defense 'no_such_defense'"),
    (["--moderation-only", "--defenses", "protector"], "--moderation-only serves no model"),
    (["--model", "tiny:qwen2", "--max-batch", "0"], "--max-batch"),
    (["--model", "/no/such/folder"], "does not exist"),
])
def test_bad_command_lines_fail_with_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "guardrails", "serve", *args], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
