"""Policies decide the agent's next action. Every policy speaks OpenAI chat messages and tool calls,
so trajectories look the same whichever produced them.

A policy returns one assistant message (OpenAI format: role, content, tool_calls with arguments as a
JSON string) plus notes for the trajectory (retries, parse errors, token usage).
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, Field

from corral.errors import CorralError


class PolicyReply(BaseModel):
    message: dict[str, Any]  # {"role": "assistant", "content": str | None, "tool_calls": [...]}
    usage: dict[str, int] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)  # retries, repaired tool calls, context trimming
    done: bool = False  # the policy has nothing more to say (scripted list exhausted, say)


class Policy(Protocol):
    name: str  # "scripted", "replay", "openai"
    model: str | None

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, task_id: str,
                  episode_id: str) -> PolicyReply: ...


class AgentPolicyError(CorralError):
    """A policy cannot produce an action (bad configuration, unreachable model server)."""
