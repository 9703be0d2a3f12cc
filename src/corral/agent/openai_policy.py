"""A policy backed by any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, Ollama, ...).

It goes through the official `openai` client, but keeps the retry loop for itself (the client's own
retries are switched off) so that every retry, repair and trim lands in PolicyReply.notes and thus in
the trajectory: a run that quietly retried ten times or silently lost half its history is not the
same experiment as one that did not.

    policy = OpenAIPolicy(base_url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")
    reply = await policy.act(messages, tools, task_id="fizzbuzz", episode_id="ep-1")
    await policy.aclose()
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.agent.policy import AgentPolicyError, PolicyReply
from corral.errors import ConfigError

# Phrases servers use when a prompt does not fit: vLLM ("maximum context length is N tokens"),
# SGLang ("longer than the model's context length"), OpenAI (code context_length_exceeded), others.
_OVERFLOW = re.compile(r"context length|maximum context|too many tokens|context_length_exceeded|context window",
                       re.IGNORECASE)
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```", re.DOTALL)
_MAX_BACKOFF = 30.0


def _default_api_key() -> str:
    # Local servers (vLLM, SGLang, Ollama) accept any key but the client insists on one.
    return os.environ.get("OPENAI_API_KEY") or "EMPTY"


class OpenAIPolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str  # e.g. http://127.0.0.1:8000/v1 (vLLM/SGLang), http://127.0.0.1:11434/v1 (Ollama)
    model: str = Field(min_length=1)
    # repr=False: configs get logged and stored with trajectories; the key must not be.
    api_key: str | None = Field(default_factory=_default_api_key, repr=False)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(1024, ge=1)
    seed: int | None = None
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0)  # retries after the first attempt
    retry_backoff: float = Field(0.5, ge=0)  # seconds before the first retry; doubles each time, capped at 30 s
    context_tokens: int | None = Field(None, ge=1)  # the server's context window; None: never trim up front
    extra_body: dict[str, Any] = Field(default_factory=dict)  # server-specific fields (top_k, chat_template_kwargs)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        v = v.strip()
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str:
        return v or _default_api_key()

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> OpenAIPolicyConfig:
        """Build from a mapping (a YAML section, CLI options); a malformed one raises ConfigError naming the field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}"
                                 for err in e.errors())
            raise ConfigError(f"openai policy config: {problems}") from None


def estimate_tokens(obj: Any) -> int:
    """A tokenizer-free estimate (about 4 characters a token), good enough to decide what to trim."""
    return len(json.dumps(obj, ensure_ascii=False, default=str)) // 4 + 1


def _get(obj: Any, key: str) -> Any:
    # The client builds response objects leniently, so a non-conforming server can leave plain dicts in them.
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def trim_messages(messages: list[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], int]:
    """Drop the oldest messages until the estimate fits `budget` tokens; return (kept, number dropped).

    System messages and the first user message (the task) are always kept, and so is the most recent
    turn. An assistant message with tool calls and the tool results answering it go together: a tool
    result without its call (or a call without its results) is rejected by most servers.
    """
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    pinned = {i for i, m in enumerate(messages) if m.get("role") in ("system", "developer") or i == first_user}
    groups: list[list[int]] = []
    for i, m in enumerate(messages):
        if i in pinned:
            continue
        if m.get("role") == "tool" and groups:
            groups[-1].append(i)  # a result belongs with the call before it
        else:
            groups.append([i])
    sizes = [estimate_tokens(m) for m in messages]
    total = sum(sizes)
    dropped: set[int] = set()
    for group in groups[:-1]:  # never the last turn: the model must see what it is answering
        if total <= budget:
            break
        dropped.update(group)
        total -= sum(sizes[i] for i in group)
    return [m for i, m in enumerate(messages) if i not in dropped], len(dropped)


def repair_arguments(raw: str) -> tuple[str | None, str | None]:
    """Return (valid JSON object text, what was repaired) or (None, None) when it cannot be repaired safely.

    Only strips (code fences, trailing text after the object, one layer of string encoding); never
    rewrites quotes or brackets, since guessing could call a tool with arguments the model never meant.
    """
    text = raw.strip()
    fixes: list[str] = []
    if not text:
        return "{}", "empty arguments taken as {}"
    fence = _FENCE.match(text)
    if fence:
        text = fence.group(1).strip()
        fixes.append("stripped a code fence")
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None, None
    if text[end:].strip():
        fixes.append("stripped trailing text")
    if isinstance(value, str):  # double-encoded: "{\"path\": ...}"
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, None
        fixes.append("decoded a JSON string")
    if not isinstance(value, dict):
        return None, None
    return json.dumps(value, ensure_ascii=False), ", ".join(fixes)


def _is_overflow(e: openai.APIStatusError) -> bool:
    return e.status_code in (400, 413, 422) and (e.code == "context_length_exceeded" or bool(_OVERFLOW.search(str(e))))


def _retryable(e: Exception) -> bool:
    # The statuses the client itself would retry: request timeout, lock conflict, rate limit, server errors.
    if isinstance(e, openai.APIConnectionError):  # APITimeoutError is a connection error too
        return True
    return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409, 429) or e.status_code >= 500)


def _retry_after(e: Exception) -> float | None:
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class OpenAIPolicy:
    """The Policy protocol over an OpenAI-compatible server; one instance serves many episodes concurrently."""

    name = "openai"

    def __init__(self, config: OpenAIPolicyConfig | Mapping[str, Any] | None = None, **fields: Any) -> None:
        if isinstance(config, OpenAIPolicyConfig):
            if fields:
                config = config.model_copy(update=fields)
                config = OpenAIPolicyConfig.parse(config.model_dump())  # re-validate the overrides
        else:
            config = OpenAIPolicyConfig.parse({**(config or {}), **fields})
        self.config: OpenAIPolicyConfig = config
        self.model: str | None = config.model
        # max_retries=0: our own loop retries, so each retry is recorded in the reply's notes.
        self._client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key,
                                          timeout=config.timeout, max_retries=0)

    async def __aenter__(self) -> OpenAIPolicy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.close()

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, task_id: str,
                  episode_id: str) -> PolicyReply:
        notes: list[str] = []
        send = list(messages)  # never mutate the runner's history: trimming only affects what is sent
        if self.config.context_tokens is not None:
            reserve = (self.config.max_tokens or 0) + (estimate_tokens(tools) if tools else 0)
            budget = max(self.config.context_tokens - reserve, 1)
            before = estimate_tokens(send)
            if before > budget:
                send, dropped = trim_messages(send, budget)
                if dropped:
                    notes.append(f"context: dropped {dropped} older messages to fit context_tokens="
                                 f"{self.config.context_tokens} (estimated {before} -> {estimate_tokens(send)} tokens)")
                if estimate_tokens(send) > budget:
                    notes.append("context: still over the estimated budget after trimming; sent anyway")

        overflow_retried = False
        while True:
            try:
                completion = await self._create(send, tools, notes)
                break
            except openai.APIStatusError as e:
                if not _is_overflow(e):
                    raise self._status_error(e) from None
                if overflow_retried:
                    raise AgentPolicyError(
                        f"model server at {self.config.base_url} still reports a context overflow after trimming "
                        f"the history to {len(send)} messages ({_short(e)}); give the model a longer context "
                        "(vLLM: --max-model-len) or set context_tokens / lower max_tokens in the policy config"
                    ) from None
                before = estimate_tokens(send)
                smaller, dropped = trim_messages(send, before // 2)
                if not dropped:
                    raise AgentPolicyError(
                        f"model server at {self.config.base_url} reports a context overflow ({_short(e)}) and "
                        "nothing is left to trim (system prompt, task and latest turn only); lower max_tokens "
                        "or give the model a longer context (vLLM: --max-model-len)"
                    ) from None
                notes.append(f"context overflow reported by the server; dropped {dropped} older messages "
                             f"({len(send)} -> {len(smaller)}, estimated {before} -> {estimate_tokens(smaller)} "
                             "tokens) and retried")
                send = smaller
                overflow_retried = True

        return self._reply(completion, tools, notes)

    async def _create(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], notes: list[str]) -> Any:
        c = self.config
        kwargs: dict[str, Any] = {"model": c.model, "messages": messages, "temperature": c.temperature}
        if tools:  # an empty tools array is rejected by OpenAI; omit both fields instead
            kwargs["tools"] = tools
            kwargs["tool_choice"] = "auto"
        if c.top_p is not None:
            kwargs["top_p"] = c.top_p
        if c.max_tokens is not None:
            kwargs["max_tokens"] = c.max_tokens
        if c.seed is not None:
            kwargs["seed"] = c.seed
        if c.extra_body:
            kwargs["extra_body"] = c.extra_body
        attempt = 0
        while True:
            try:
                return await self._client.chat.completions.create(**kwargs)
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                if not _retryable(e):
                    raise
                if attempt >= c.max_retries:
                    raise AgentPolicyError(
                        f"model server at {c.base_url} did not answer after {attempt + 1} attempts "
                        f"({type(e).__name__}: {_short(e)}). Fix: start the server (vLLM: 'vllm serve {c.model}', "
                        f"SGLang: 'python -m sglang.launch_server --model-path {c.model}', Ollama: 'ollama serve'), "
                        "check base_url (it usually ends in /v1) or raise timeout / max_retries"
                    ) from None
                delay = _retry_after(e)
                if delay is None:
                    delay = min(c.retry_backoff * 2**attempt, _MAX_BACKOFF)
                attempt += 1
                notes.append(f"retry {attempt}/{c.max_retries} after {type(e).__name__}: {_short(e)} "
                             f"(waited {delay:.2f}s)")
                await asyncio.sleep(delay)

    def _status_error(self, e: openai.APIStatusError) -> AgentPolicyError:
        c = self.config
        hint = {
            401: "check api_key (or OPENAI_API_KEY)",
            403: "check api_key (or OPENAI_API_KEY) and its permissions",
            404: f"check base_url (it usually ends in /v1) and that the server serves model {c.model!r}",
        }.get(e.status_code, "check the request options (model, max_tokens, extra_body) against the server")
        return AgentPolicyError(f"model server at {c.base_url} refused the request "
                                f"(HTTP {e.status_code}: {_short(e)}); {hint}")

    def _reply(self, completion: Any, tools: list[dict[str, Any]], notes: list[str]) -> PolicyReply:
        choices = _get(completion, "choices") or []
        if not choices:
            raise AgentPolicyError(f"model server at {self.config.base_url} answered without choices: "
                                   f"{_short(completion)}")
        choice = choices[0]
        msg = _get(choice, "message")
        if _get(choice, "finish_reason") == "length":
            notes.append(f"reply cut off at max_tokens={self.config.max_tokens} (finish_reason=length)")
        known = {_get(_get(t, "function") or {}, "name") for t in tools if _get(t, "type") == "function"}
        tool_calls: list[dict[str, Any]] = []
        for n, tc in enumerate(_get(msg, "tool_calls") or []):
            fn = _get(tc, "function") or {}
            call_id = _get(tc, "id")
            if not call_id:  # the runner answers each call by id, so it must have one
                call_id = f"call_{uuid.uuid4().hex[:16]}"
                notes.append(f"tool call #{n} had no id; assigned {call_id}")
            name = _get(fn, "name") or ""
            args = _get(fn, "arguments")
            if args is None:
                args = ""
            if not isinstance(args, str):  # some servers send an object rather than a JSON string
                args = json.dumps(args, ensure_ascii=False, default=str)
                notes.append(f"tool call {call_id} arguments were not a string; encoded as JSON")
            try:
                ok = isinstance(json.loads(args), dict)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                fixed, how = repair_arguments(args)
                if fixed is not None:
                    notes.append(f"tool call {call_id} arguments repaired ({how})")
                    args = fixed
                else:
                    notes.append(f"tool call {call_id} arguments are not valid JSON")
            if name not in known:
                notes.append(f"tool call {call_id} names unknown tool {name!r} (known: {', '.join(sorted(known))})")
            tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})

        content = _get(msg, "content")
        if not tool_calls:
            if not content:
                notes.append("reply has neither text nor tool calls")
                content = ""  # an assistant message needs content or tool_calls to be sent back
            elif "<tool_call>" in content or '"arguments"' in content:
                notes.append("reply text looks like a tool call the server did not parse; enable the server's "
                             "tool parser (vLLM: --enable-auto-tool-choice --tool-call-parser ...)")
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:  # OpenAI rejects an empty tool_calls list in later requests
            message["tool_calls"] = tool_calls

        usage: dict[str, int] = {}
        u = _get(completion, "usage")
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = _get(u, key) if u is not None else None
            if isinstance(value, int):
                usage[key] = value
        return PolicyReply(message=message, usage=usage, notes=notes)


def _short(obj: Any, limit: int = 300) -> str:
    text = str(obj)
    return text if len(text) <= limit else text[:limit] + "..."
