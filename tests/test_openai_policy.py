"""OpenAIPolicy against a scripted OpenAI-compatible server.

The small HTTP server below STANDS IN FOR A MODEL SERVER (vLLM, SGLang, Ollama): no LLM runs here.
It implements POST /v1/chat/completions, answers from a queue of scripted responses that each test
sets, and records every request it got, so the tests drive the real `openai` client through
OpenAIPolicy and check both what was sent and how the replies are turned into PolicyReply.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from corral.agent.openai_policy import OpenAIPolicy, OpenAIPolicyConfig, repair_arguments, trim_messages
from corral.agent.policy import AgentPolicyError, PolicyReply
from corral.errors import ConfigError

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "bash", "description": "Run a shell command in /workspace.",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Write a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"]}}},
]


class FakeModelServer:
    """Scripted /v1/chat/completions: each request pops one (status, body, headers, delay) from `script`."""

    def __init__(self) -> None:
        self.script: list[tuple[int, Any, dict[str, str], float]] = []
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                req_headers = {k.lower(): v for k, v in self.headers.items()}
                with server.lock:
                    server.requests.append({"path": self.path, "headers": req_headers,
                                            "body": json.loads(body or b"{}")})
                    step = server.script.pop(0) if server.script else (
                        418, {"error": {"message": "test server: no scripted response left"}}, {}, 0.0)
                status, payload, headers, delay = step
                if self.path != "/v1/chat/completions":
                    status, payload, headers, delay = 404, {"error": {"message": f"no route {self.path}"}}, {}, 0.0
                if delay:
                    time.sleep(delay)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest output clean

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        self.script.append((status, body, headers or {}, delay))

    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]


def completion(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
               finish_reason: str = "stop", usage: dict[str, int] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000, "model": "test-model",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57}}


def call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    tc: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        tc["id"] = call_id
    return tc


def error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"object": "error", "message": message, "type": "BadRequestError", "code": status}


def history(turns: int) -> list[dict[str, Any]]:
    """system + task + `turns` tool-call/tool-result pairs + a final user nudge."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful agent."},
                                  {"role": "user", "content": "Write fizzbuzz(n) in /workspace/fizz.py"}]
    for i in range(turns):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "bash", "arguments": json.dumps(
                {"command": f"echo step {i}"})}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"step {i} " + "x" * 400})
    msgs.append({"role": "user", "content": "continue"})
    return msgs


def assert_pairs_intact(msgs: list[dict[str, Any]]) -> None:
    """Every tool result answers a call made earlier in the same list, and every call is answered."""
    called: set[str] = set()
    answered: set[str] = set()
    for m in msgs:
        for tc in m.get("tool_calls") or []:
            called.add(tc["id"])
        if m["role"] == "tool":
            assert m["tool_call_id"] in called, f"orphan tool result {m['tool_call_id']}"
            answered.add(m["tool_call_id"])
    assert called == answered


@pytest.fixture(scope="module")
def server() -> Iterator[FakeModelServer]:
    s = FakeModelServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def fake(server: FakeModelServer, monkeypatch: pytest.MonkeyPatch) -> FakeModelServer:
    server.script.clear()
    server.requests.clear()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return server


@pytest.fixture
async def make_policy(fake: FakeModelServer):
    made: list[OpenAIPolicy] = []

    def make(**kw: Any) -> OpenAIPolicy:
        cfg: dict[str, Any] = {"base_url": fake.base_url, "model": "test-model", "retry_backoff": 0.01, **kw}
        p = OpenAIPolicy(OpenAIPolicyConfig.parse(cfg))
        made.append(p)
        return p

    yield make
    for p in made:
        await p.aclose()


async def act(policy: OpenAIPolicy, messages: list[dict[str, Any]] | None = None,
              tools: list[dict[str, Any]] | None = None) -> PolicyReply:
    msgs = messages if messages is not None else history(0)
    return await policy.act(msgs, TOOLS if tools is None else tools, task_id="fizzbuzz", episode_id="ep-1")


async def test_tool_call_reply_and_request_shape(fake: FakeModelServer, make_policy) -> None:
    fake.reply(200, completion(None, [call("call_1", "bash", '{"command": "ls -la"}')], "tool_calls",
                               {"prompt_tokens": 120, "completion_tokens": 15, "total_tokens": 135}))
    policy = make_policy(seed=7, top_p=0.9, extra_body={"top_k": 20})
    assert (policy.name, policy.model) == ("openai", "test-model")
    msgs = history(1)
    reply = await act(policy, msgs)

    assert reply.message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls -la"}'}}]}
    assert reply.usage == {"prompt_tokens": 120, "completion_tokens": 15, "total_tokens": 135}
    assert reply.notes == [] and reply.done is False

    [req] = fake.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer EMPTY"  # what local servers accept
    body = req["body"]
    assert body["model"] == "test-model"
    assert body["messages"] == msgs  # sent as given, in OpenAI format
    assert body["tools"] == TOOLS
    assert all(t["type"] == "function" and {"name", "parameters"} <= t["function"].keys() for t in body["tools"])
    assert body["tool_choice"] == "auto"
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.0, 0.9, 1024, 7)
    assert body["top_k"] == 20  # extra_body is merged into the request for server-specific options
    assert body.get("stream") in (None, False)


async def test_optional_fields_are_omitted_and_env_key_used(fake: FakeModelServer, make_policy,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    fake.reply(200, completion("hello"))
    policy = make_policy(max_tokens=None)
    await act(policy, tools=[])
    body = fake.requests[0]["body"]
    assert fake.requests[0]["headers"]["authorization"] == "Bearer sk-test-key"
    for absent in ("tools", "tool_choice", "top_p", "seed", "max_tokens"):
        assert absent not in body, absent  # OpenAI rejects an empty tools array; None options are not sent
    assert "sk-test-key" not in repr(policy.config)  # the key stays out of logs and stored configs


async def test_text_only_reply_is_returned(fake: FakeModelServer, make_policy) -> None:
    fake.reply(200, completion("I am done: fizz.py is written."))
    reply = await act(make_policy())
    assert reply.message == {"role": "assistant", "content": "I am done: fizz.py is written."}
    assert "tool_calls" not in reply.message
    assert reply.notes == []


async def test_empty_reply_gets_empty_content_and_note(fake: FakeModelServer, make_policy) -> None:
    fake.reply(200, completion(None, finish_reason="length"))
    reply = await act(make_policy(max_tokens=16))
    assert reply.message == {"role": "assistant", "content": ""}
    assert any("finish_reason=length" in n for n in reply.notes)
    assert any("neither text nor tool calls" in n for n in reply.notes)


async def test_malformed_arguments_repaired_or_kept_raw(fake: FakeModelServer, make_policy) -> None:
    fenced = '```json\n{"command": "pytest -q"}\n```'
    trailing = '{"path": "a.py", "content": "x = 1"} I will now run it.'
    broken = "{'command': 'ls'}"  # single quotes: repairing would mean guessing, so it is kept as is
    fake.reply(200, completion(None, [call("a", "bash", fenced), call("b", "write_file", trailing),
                                      call("c", "bash", broken), call("d", "bash", "")], "tool_calls"))
    reply = await act(make_policy())
    args = [tc["function"]["arguments"] for tc in reply.message["tool_calls"]]
    assert json.loads(args[0]) == {"command": "pytest -q"}
    assert json.loads(args[1]) == {"path": "a.py", "content": "x = 1"}
    assert args[2] == broken
    assert args[3] == "{}"
    assert "tool call c arguments are not valid JSON" in reply.notes
    assert any(n.startswith("tool call a arguments repaired") and "code fence" in n for n in reply.notes)
    assert any(n.startswith("tool call b arguments repaired") and "trailing text" in n for n in reply.notes)
    assert not any(n.startswith("tool call a arguments are not valid") for n in reply.notes)


async def test_unknown_tool_and_missing_id_are_noted(fake: FakeModelServer, make_policy) -> None:
    fake.reply(200, completion(None, [call("x1", "rm_rf", '{"path": "/"}'), call(None, "bash", '{"command": "ls"}')],
                               "tool_calls"))
    reply = await act(make_policy())
    calls = reply.message["tool_calls"]
    assert calls[0]["function"]["name"] == "rm_rf"  # kept: the runner answers it with an error observation
    assert any(n.startswith("tool call x1 names unknown tool 'rm_rf'") for n in reply.notes)
    assert calls[1]["id"].startswith("call_")
    assert any("had no id" in n for n in reply.notes)


async def test_server_error_is_retried(fake: FakeModelServer, make_policy) -> None:
    fake.reply(*error(500, "CUDA out of memory"))
    fake.reply(200, completion(None, [call("c", "bash", '{"command": "ls"}')], "tool_calls"))
    reply = await act(make_policy())
    assert len(fake.requests) == 2
    assert fake.bodies()[0] == fake.bodies()[1]
    assert reply.message["tool_calls"][0]["id"] == "c"
    assert len(reply.notes) == 1 and reply.notes[0].startswith("retry 1/3 after InternalServerError")


async def test_rate_limit_honours_retry_after(fake: FakeModelServer, make_policy) -> None:
    fake.reply(*error(429, "slow down"), headers={"retry-after": "0.05"})
    fake.reply(200, completion("ok"))
    reply = await act(make_policy(retry_backoff=5.0))  # would take 5 s if retry-after were ignored
    assert reply.message["content"] == "ok"
    assert reply.notes[0].startswith("retry 1/3 after RateLimitError") and "waited 0.05s" in reply.notes[0]


async def test_persistent_server_error_gives_up(fake: FakeModelServer, make_policy) -> None:
    for _ in range(3):
        fake.reply(*error(503, "loading model"))
    with pytest.raises(AgentPolicyError, match=r"did not answer after 3 attempts") as ei:
        await act(make_policy(max_retries=2))
    assert fake.base_url in str(ei.value)
    assert len(fake.requests) == 3


async def test_context_overflow_trims_and_retries_once(fake: FakeModelServer, make_policy) -> None:
    fake.reply(*error(400, "This model's maximum context length is 4096 tokens. However, you requested 5000 "
                           "tokens in the messages. Please reduce the length of the messages."))
    fake.reply(200, completion(None, [call("c9", "bash", '{"command": "ls"}')], "tool_calls"))
    msgs = history(8)
    reply = await act(make_policy(), msgs)

    first, second = fake.bodies()
    assert first["messages"] == msgs
    assert len(second["messages"]) < len(first["messages"])
    assert second["messages"][:2] == msgs[:2]  # system prompt and task survive
    assert second["messages"][-1] == msgs[-1]  # so does the latest turn
    assert_pairs_intact(second["messages"])
    assert len(msgs) == 2 + 16 + 1  # the caller's history is not touched
    assert any(n.startswith("context overflow reported by the server") for n in reply.notes)
    assert reply.message["tool_calls"][0]["id"] == "c9"


async def test_context_overflow_twice_raises(fake: FakeModelServer, make_policy) -> None:
    fake.reply(*error(400, "The input (9000 tokens) is longer than the model's context length (8192 tokens)."))
    fake.reply(*error(400, "The input (6000 tokens) is longer than the model's context length (8192 tokens)."))
    with pytest.raises(AgentPolicyError, match=r"still reports a context overflow"):
        await act(make_policy(), history(6))
    assert len(fake.requests) == 2


async def test_other_bad_request_is_not_retried(fake: FakeModelServer, make_policy) -> None:
    fake.reply(*error(400, "temperature must be non-negative"))
    with pytest.raises(AgentPolicyError, match=r"refused the request \(HTTP 400"):
        await act(make_policy())
    assert len(fake.requests) == 1


async def test_wrong_path_hints_at_base_url(fake: FakeModelServer) -> None:
    policy = OpenAIPolicy(base_url=f"http://127.0.0.1:{fake.port}", model="m", retry_backoff=0.01)  # no /v1
    try:
        with pytest.raises(AgentPolicyError, match=r"HTTP 404.*usually ends in /v1"):
            await act(policy)
    finally:
        await policy.aclose()


async def test_context_tokens_trims_before_sending(fake: FakeModelServer, make_policy) -> None:
    fake.reply(200, completion("ok"))
    msgs = history(10)
    reply = await act(make_policy(context_tokens=1200, max_tokens=200), msgs)
    sent = fake.bodies()[0]["messages"]
    assert len(sent) < len(msgs)
    assert sent[:2] == msgs[:2] and sent[-1] == msgs[-1]
    assert_pairs_intact(sent)
    assert any(n.startswith("context: dropped") for n in reply.notes)


async def test_timeout_then_gives_up(fake: FakeModelServer, make_policy) -> None:
    fake.reply(200, completion("too late"), delay=1.5)
    with pytest.raises(AgentPolicyError, match=r"after 1 attempts \(APITimeoutError"):
        await act(make_policy(timeout=0.2, max_retries=0))


async def test_unreachable_server_raises_after_retries() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    policy = OpenAIPolicy(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, timeout=2,
                          retry_backoff=0.01)
    try:
        with pytest.raises(AgentPolicyError) as ei:
            await act(policy)
    finally:
        await policy.aclose()
    text = str(ei.value)
    assert f"127.0.0.1:{port}/v1" in text and "after 2 attempts" in text and "APIConnectionError" in text
    assert "vllm serve" in text  # says how to fix it


@pytest.mark.parametrize(("cfg", "field"), [
    ({"base_url": "http://127.0.0.1:8000/v1"}, "model"),
    ({"base_url": 8000, "model": "m"}, "base_url"),
    ({"base_url": "localhost:8000/v1", "model": "m"}, "base_url"),
    ({"base_url": "http://h/v1", "model": "m", "temperature": -1}, "temperature"),
    ({"base_url": "http://h/v1", "model": "m", "max_retries": -1}, "max_retries"),
    ({"base_url": "http://h/v1", "model": "m", "modle": "typo"}, "modle"),
])
def test_bad_config_names_the_field(cfg: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        OpenAIPolicyConfig.parse(cfg)
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        OpenAIPolicy(**cfg)


async def test_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = OpenAIPolicyConfig.parse({"base_url": "http://127.0.0.1:8000/v1/", "model": "m", "api_key": None})
    assert cfg.api_key == "EMPTY" and cfg.base_url == "http://127.0.0.1:8000/v1"
    assert (cfg.temperature, cfg.max_tokens, cfg.timeout, cfg.max_retries, cfg.context_tokens) == (0.0, 1024, 120, 3,
                                                                                                  None)
    policy = OpenAIPolicy(cfg, model="other")  # keyword overrides on top of a config
    assert policy.model == "other"
    await policy.aclose()


def test_repair_arguments() -> None:
    assert repair_arguments('```\n{"a": 1}\n```') == ('{"a": 1}', "stripped a code fence")
    assert repair_arguments('{"a": 1}}') == ('{"a": 1}', "stripped trailing text")
    assert repair_arguments('"{\\"a\\": 1}"') == ('{"a": 1}', "decoded a JSON string")
    assert repair_arguments("{'a': 1}") == (None, None)
    assert repair_arguments('{"a": 1') == (None, None)
    assert repair_arguments("[1, 2]") == (None, None)  # arguments must be an object


def test_trim_keeps_head_pairs_and_last_turn() -> None:
    msgs = history(5)
    kept, dropped = trim_messages(msgs, budget=1)  # an impossible budget drops all that may go
    assert dropped == 10
    assert kept == [msgs[0], msgs[1], msgs[-1]]
    kept, dropped = trim_messages(msgs, budget=10**9)
    assert (kept, dropped) == (msgs, 0)
    # the last turn is a call and its result: they stay together
    msgs = history(3)[:-1]
    kept, _ = trim_messages(msgs, budget=1)
    assert kept == msgs[:2] + msgs[-2:]
    assert_pairs_intact(kept)
