"""The tools an agent gets, as OpenAI function schemas, and how each runs in a sandbox.

Every tool call is a step of the sandbox (the shell through a persistent session; the file tools
through corral's own helpers, still as steps), so findings name the tool call that caused them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from corral.errors import CorralError, FileAccessError, SessionError
from corral.sandbox.sandbox import Sandbox
from corral.text import clip_counted

OBSERVATION_LIMIT = 16_000  # characters an observation keeps; the rest is cut with a note

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "shell",
        "description": "Run a bash command in a persistent shell (cwd, env and shell state carry over). "
                       "Returns exit code, stdout and stderr.",
        "parameters": {"type": "object", "properties": {
            "command": {"type": "string", "description": "The command line to run."},
            "timeout": {"type": "number", "description": "Seconds before the command is killed."}},
            "required": ["command"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "read_file",
        "description": "Read a text file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "write_file",
        "description": "Create or overwrite a file with the given content.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "edit_file",
        "description": "Replace one exact occurrence of `old` with `new` in a file (fails if `old` occurs "
                       "zero or several times).",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
            "required": ["path", "old", "new"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "submit",
        "description": "Finish the task; the work is then graded.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}


@dataclass
class ToolResult:
    observation: str
    exit_code: int | None = None
    duration: float = 0.0
    step: int | None = None
    error: bool = False
    submitted: bool = False
    stdout: str = ""
    stderr: str = ""


def parse_arguments(raw: str | dict | None) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("tool arguments must be a JSON object")
    return value


def _cut(text: str) -> str:
    return clip_counted(text, OBSERVATION_LIMIT, "\n[... {n} more characters cut]")


async def run_tool(sb: Sandbox, name: str, args: dict[str, Any], *, tool_call_id: str, session: str = "agent",
                   command_timeout: float | None = None) -> ToolResult:
    """Run one tool call. Errors become observations (the agent sees them); they never raise."""
    try:
        if name == "shell":
            cmd = args.get("command")
            if not isinstance(cmd, str) or not cmd.strip():
                return ToolResult("error: shell needs a non-empty 'command' string", error=True)
            timeout = command_timeout
            if args.get("timeout") is not None:
                # the model may ask for less time than the task allows, never more
                try:
                    asked = float(args["timeout"])
                except (TypeError, ValueError):
                    return ToolResult(f"error: 'timeout' must be a number of seconds, not {args['timeout']!r}",
                                      error=True)
                if not asked > 0:
                    return ToolResult("error: 'timeout' must be a positive number of seconds", error=True)
                timeout = min(asked, command_timeout) if command_timeout else asked
            if session not in sb.sessions():
                await sb.create_session(session)
            r = await sb.run_in_session(session, cmd, timeout=float(timeout) if timeout else None,
                                        tool_call_id=tool_call_id)
            parts = [f"exit code: {r.exit_code}"]
            if r.refused or r.timed_out or r.error:
                parts.append(f"error: {r.error}")
            if r.stdout:
                parts.append(f"stdout:\n{r.stdout}")
            if r.stderr:
                parts.append(f"stderr:\n{r.stderr}")
            if r.truncated:
                parts.append("[output was truncated]")
            return ToolResult(_cut("\n".join(parts)), r.exit_code, r.duration, r.step,
                              error=r.exit_code != 0 or r.refused, stdout=_cut(r.stdout), stderr=_cut(r.stderr))
        if name == "read_file":
            data = await sb.read_file(str(args["path"]), as_step=True, tool_call_id=tool_call_id)
            return ToolResult(_cut(data.decode("utf-8", errors="replace")), 0, step=sb.step)
        if name == "write_file":
            await sb.write_file(str(args["path"]), str(args["content"]), as_step=True, tool_call_id=tool_call_id)
            return ToolResult(f"wrote {len(str(args['content']))} characters to {args['path']}", 0, step=sb.step)
        if name == "edit_file":
            path, old, new = str(args["path"]), str(args["old"]), str(args["new"])
            text = (await sb.read_file(path, as_step=True, tool_call_id=tool_call_id)).decode("utf-8", "replace")
            count = text.count(old) if old else 0
            if count != 1:
                return ToolResult(f"error: 'old' occurs {count} times in {path}; it must occur exactly once",
                                  1, step=sb.step, error=True)
            await sb.write_file(path, text.replace(old, new, 1), as_step=True, tool_call_id=tool_call_id)
            return ToolResult(f"edited {path}", 0, step=sb.step)
        if name == "submit":
            return ToolResult("submitted", 0, submitted=True)
        return ToolResult(f"error: unknown tool {name!r}; use one of {sorted(TOOL_NAMES)}", error=True)
    except KeyError as e:
        return ToolResult(f"error: {name} needs the argument {e.args[0]!r}", error=True)
    except (FileAccessError, SessionError) as e:
        return ToolResult(f"error: {e}", 1, step=sb.step, error=True)
    except CorralError:
        raise  # the sandbox itself is gone or the episode ended: the runner decides
