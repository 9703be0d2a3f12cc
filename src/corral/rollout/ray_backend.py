"""Rollouts on a Ray cluster: each node runs its own sandboxes, the driver writes the trajectories.

    summary = await run_rollout_ray("10.0.0.1:6379", tasks, {"kind": "scripted", "actions": {...}},
                                    n=4, concurrency=64, out=Path("traj.jsonl"))

The contract is run_rollout's: n episodes of each task, finished episodes in `out` skipped (resume
by episode id; episodes that ended in an error run again), each trajectory appended to `out` by the
driver as it arrives, and a Summary at the end.

One `NodeWorker` actor is pinned to each node that takes part (nodes with a `corral` custom
resource when any has one, else every live node; no more nodes than `concurrency`). On first use it
starts a corral Runtime of its own on its node (sandboxes, gateway, DNS, nftables, monitor: the node
needs Linux and root, as corral always does), and runs episodes there with `run_episode`. Findings
come back inside the trajectory, attributed (rule, step, command, evidence ids); the node's event
store keeps the full events (`trajectory.store_url` is a path on that node) and
`trajectory.metrics["node"]` says which node ran the episode.

A policy travels as a small picklable spec and is built on the node by `policy_from_spec`:
{"kind": "scripted", "actions": {task_id: [...]}}, {"kind": "replay", "by_task": {task_id: [...]}}
or {"kind": "openai", "config": {...OpenAIPolicyConfig fields}}. `policy_spec(policy)` makes one
from a policy object.

Ray is imported only when used: corral itself does not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from corral.agent.policy import AgentPolicyError, Policy
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task
from corral.agent.trajectory import Trajectory, append_jsonl, read_jsonl
from corral.config import RuntimeConfig
from corral.errors import CorralError
from corral.events import new_run_id
from corral.rollout.runner import Summary, episode_id, finished, pending, resumed_run, summarize

CORRAL_RESOURCE = "corral"  # `ray start --resources='{"corral": 1}'` marks the nodes that run sandboxes
DEFAULT_NODE_STATE_DIR = "/var/lib/corral"  # a node's state dir when runtime_config has none and CORRAL_HOME is unset
_CLOSE_TIMEOUT = 60.0


class RayBackendError(CorralError):
    """The Ray cluster cannot run the rollout (no live node)."""


# -- policies as data ------------------------------------------------------------------------------
def policy_from_spec(spec: Mapping[str, Any]) -> Policy:
    """Build a policy from its spec (see the module docstring); a bad spec raises AgentPolicyError."""
    if not isinstance(spec, Mapping):
        raise AgentPolicyError(f"a policy spec is a mapping with 'kind', got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "scripted":
        from corral.agent.scripted import ScriptedPolicy

        actions = spec.get("actions")
        if not isinstance(actions, Mapping):
            raise AgentPolicyError("scripted policy spec needs 'actions': {task_id: [action, ...]}")
        return ScriptedPolicy({str(k): list(v) for k, v in actions.items()})
    if kind == "replay":
        from corral.agent.scripted import ReplayPolicy

        by_task = spec.get("by_task")
        if not isinstance(by_task, Mapping):
            raise AgentPolicyError("replay policy spec needs 'by_task': {task_id: [assistant message, ...]}")
        return ReplayPolicy({str(k): list(v) for k, v in by_task.items()})
    if kind == "openai":
        from corral.agent.openai_policy import OpenAIPolicy, OpenAIPolicyConfig

        config = spec.get("config")
        if not isinstance(config, Mapping):
            raise AgentPolicyError("openai policy spec needs 'config': {base_url: ..., model: ...}")
        return OpenAIPolicy(OpenAIPolicyConfig.parse(config))
    raise AgentPolicyError(f"unknown policy kind {kind!r}; use 'scripted', 'replay' or 'openai'")


def policy_spec(policy: Any) -> dict[str, Any]:
    """The spec of a ScriptedPolicy, ReplayPolicy or OpenAIPolicy, to send to the nodes.

    An OpenAI policy's spec carries its api_key (the nodes need it): do not log the spec."""
    from corral.agent.scripted import ReplayPolicy, ScriptedPolicy

    if isinstance(policy, ScriptedPolicy):
        return {"kind": "scripted", "actions": policy.actions}
    if isinstance(policy, ReplayPolicy):
        return {"kind": "replay", "by_task": policy.by_task}
    if getattr(policy, "name", None) == "openai" and hasattr(policy, "config"):
        return {"kind": "openai", "config": policy.config.model_dump(mode="json")}
    raise AgentPolicyError(f"policy {type(policy).__name__} cannot be sent to Ray nodes; "
                           "use a scripted, replay or openai policy")


def _spec_key(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


async def _aclose(policy: Any) -> None:
    close = getattr(policy, "aclose", None)
    if close is not None:
        await close()


# -- the actor -------------------------------------------------------------------------------------
class NodeWorker:
    """Runs episodes on one node, in a corral Runtime of its own (made a Ray actor by run_rollout_ray)."""

    def __init__(self, runtime_config: dict[str, Any] | None = None) -> None:
        cfg = dict(runtime_config or {})
        # A relative default would land in whatever directory the node's Ray worker started in.
        cfg.setdefault("state_dir", os.environ.get("CORRAL_HOME") or DEFAULT_NODE_STATE_DIR)
        self._config = RuntimeConfig.model_validate(cfg)
        self._runtime: Any = None
        self._lock: asyncio.Lock | None = None
        self._policies: dict[str, Policy] = {}
        self._info = _node_info()

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    async def start(self) -> dict[str, Any]:
        """Start the node's Runtime (idempotent); returns the node's id, hostname and address."""
        await self._ensure_runtime()
        return dict(self._info)

    async def _ensure_runtime(self) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._runtime is None or not self._runtime.started:
                from corral.runtime import Runtime

                rt = Runtime(self._config)
                await rt.start()
                self._runtime = rt
            return self._runtime

    async def run(self, task_json: str, spec: dict[str, Any], ep_id: str, reward_json: str | None) -> str:
        from corral.agent.episode import run_episode

        runtime = await self._ensure_runtime()
        task = Task.model_validate_json(task_json)
        reward = RewardConfig.model_validate_json(reward_json) if reward_json else None
        key = _spec_key(spec)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = policy_from_spec(spec)
        traj = await run_episode(runtime, task, policy, episode_id=ep_id, reward=reward)
        traj.metrics["node"] = dict(self._info)
        return traj.model_dump_json()

    async def close(self) -> None:
        """Close the policies and the Runtime: every sandbox, network, cgroup and nftables table it made."""
        policies, self._policies = list(self._policies.values()), {}
        for p in policies:
            with contextlib.suppress(Exception):
                await _aclose(p)
        if self._runtime is not None:
            rt, self._runtime = self._runtime, None
            await rt.close()


def _node_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        info["id"] = ray.get_runtime_context().get_node_id()
        info["ip"] = ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit use): hostname only
        info.setdefault("id", None)
        info.setdefault("ip", None)
    return info


# -- the driver ------------------------------------------------------------------------------------
class _Slot:
    def __init__(self, actor: Any, info: dict[str, Any]) -> None:
        self.actor, self.info, self.busy, self.alive = actor, info, 0, True


def _cause(e: BaseException) -> BaseException:
    """The exception raised on the node, not Ray's wrapper."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _describe(e: BaseException) -> str:
    c = _cause(e)
    msg = str(c).strip().splitlines()
    return f"{type(c).__name__}: {msg[-1] if msg else ''}".rstrip(": ")


def _nodes(ray: Any, limit: int) -> list[dict[str, Any]]:
    alive = [n for n in ray.nodes() if n.get("Alive")]
    marked = [n for n in alive if n.get("Resources", {}).get(CORRAL_RESOURCE, 0) > 0]
    chosen = marked or alive
    return sorted(chosen, key=lambda n: n["NodeID"])[:max(1, limit)]


async def run_rollout_ray(address: str | None, tasks: list[Task], policy_spec: Mapping[str, Any], *, n: int = 1,
                          concurrency: int = 4, out: Path, reward: RewardConfig | None = None, resume: bool = True,
                          runtime_config: dict[str, Any] | None = None,
                          on_done: Callable[[Trajectory], None] | None = None,
                          init_kwargs: dict[str, Any] | None = None) -> Summary:
    """run_rollout on a Ray cluster. `address`: an existing cluster ("HOST:PORT", "auto", "ray://HOST:PORT");
    None: the Ray this process is already connected to, else a local one started now and shut down at the end.
    `concurrency`: episodes in flight across the cluster. `runtime_config`: RuntimeConfig fields for each
    node's Runtime (paths are the node's). `init_kwargs`: more ray.init arguments."""
    import ray

    spec = dict(policy_spec)
    await _aclose(policy_from_spec(spec))  # a bad spec fails here, not once per episode on the nodes
    RuntimeConfig.model_validate({"state_dir": DEFAULT_NODE_STATE_DIR, **(runtime_config or {})})
    reward_json = reward.model_dump_json() if reward is not None else None

    done = finished(out) if resume else set()
    # one run across the cluster: every node's runtime records under it (each in its own store)
    run = (runtime_config or {}).get("run_id") or (resumed_run(out) if resume else None) or new_run_id()
    runtime_config = {"run_kind": "rollout", **(runtime_config or {}), "run_id": run}
    jobs = pending(tasks, n, run, done)
    errors: list[str] = []
    ran = 0
    t0 = time.perf_counter()

    owned = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:  # a local cluster, for this machine only
            kw.update(num_cpus=2, _node_ip_address="127.0.0.1")
        kw.update(init_kwargs or {})
        ray.init(address=address, **kw)
        owned = True
    slots: list[_Slot] = []
    try:
        if jobs:
            slots = await _start_workers(ray, runtime_config, concurrency, errors)
            ran = await _dispatch(jobs, slots, spec, reward_json, concurrency, out, on_done, errors, run)
    finally:
        await _stop_workers(ray, slots)
        if owned:
            ray.shutdown()

    elapsed = time.perf_counter() - t0
    ids = {x.id for x in tasks}
    s = summarize([t for t in read_jsonl(out) if t.task_id in ids])
    s.ran_now = ran
    s.skipped = len(done)
    s.episodes_per_minute = round(60.0 * ran / elapsed, 2) if elapsed > 0 and ran else 0.0
    s.errors = errors
    return s


async def _start_workers(ray: Any, runtime_config: dict[str, Any] | None, concurrency: int,
                         errors: list[str]) -> list[_Slot]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _nodes(ray, concurrency)
    if not nodes:
        raise RayBackendError("the Ray cluster has no live nodes; start one with `ray start` or check the address")
    cls = ray.remote(NodeWorker)
    actors = [cls.options(num_cpus=0, max_concurrency=max(8, concurrency + 4), max_restarts=0,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                          ).remote(runtime_config) for node in nodes]
    results = await asyncio.gather(*(a.start.remote() for a in actors), return_exceptions=True)
    slots: list[_Slot] = []
    first: BaseException | None = None
    for node, actor, r in zip(nodes, actors, results, strict=True):
        if isinstance(r, BaseException):
            errors.append(f"node {node.get('NodeManagerHostname') or node['NodeID']}: corral runtime did not "
                          f"start: {_describe(r)}")
            first = first or _cause(r)
            ray.kill(actor)
        else:
            slots.append(_Slot(actor, r))
    if not slots:
        assert first is not None
        raise first  # no node can run sandboxes (not root, no bwrap, ...): the node's own error says why
    return slots


async def _dispatch(jobs: list[tuple[Task, int]], slots: list[_Slot], spec: dict[str, Any],
                    reward_json: str | None, concurrency: int, out: Path,
                    on_done: Callable[[Trajectory], None] | None, errors: list[str], run: str) -> int:
    import ray

    sem = asyncio.Semaphore(max(1, concurrency))
    lock = asyncio.Lock()
    ran = 0

    async def one(task: Task, i: int) -> None:
        nonlocal ran
        ep = episode_id(task, i, run)
        task_json = task.model_dump_json()
        async with sem:
            for attempt in (0, 1):  # a node lost mid-episode: once more on another node
                live = [s for s in slots if s.alive]
                if not live:
                    errors.append(f"{ep}: no Ray node left to run it")
                    return
                slot = min(live, key=lambda s: s.busy)
                slot.busy += 1
                try:
                    raw = await slot.actor.run.remote(task_json, spec, ep, reward_json)
                except ray.exceptions.RayActorError as e:
                    slot.alive = False
                    if attempt == 0 and any(s.alive for s in slots):
                        continue
                    errors.append(f"{ep}: node {slot.info.get('hostname')} lost: {_describe(e)}")
                    return
                except Exception as e:  # one broken episode must not sink the batch
                    errors.append(f"{ep}: {_describe(e)}")
                    return
                finally:
                    slot.busy -= 1
                break
        traj = Trajectory.model_validate_json(raw)
        async with lock:
            append_jsonl(out, traj)
            ran += 1
        if on_done is not None:
            on_done(traj)

    await asyncio.gather(*(one(t, i) for t, i in jobs))
    return ran


async def _stop_workers(ray: Any, slots: list[_Slot]) -> None:
    live = [s for s in slots if s.alive]
    if live:
        refs = [s.actor.close.remote() for s in live]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True), _CLOSE_TIMEOUT)
    for s in slots:
        with contextlib.suppress(Exception):
            ray.kill(s.actor)
