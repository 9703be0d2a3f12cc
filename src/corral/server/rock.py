"""ROCK's sandbox API in front of a corral runtime: the routes of `corral serve` under PREFIX.

ROCK's Python SDK (`pip install rl-rock`, `rock.sdk.sandbox.client.Sandbox`) talks to
``{base_url}/apis/envs/sandbox/v1/<route>``; every route answers ROCK's envelope
``{"status": "Success"|"Failed", "message", "error", "result"}`` and the SDK parses ``result`` into its
own pydantic models. Routes implemented (all under that prefix):

    POST start_async    {image, image_os, memory, cpus, limit_cpus, num_gpus, sandbox_id, ...}
                        -> SandboxStartResponse {sandbox_id, host_name, host_ip, cpus, memory}
    GET  get_status     ?sandbox_id=&include_all_states= -> SandboxStatusResponse
    GET  is_alive       ?sandbox_id= -> IsAliveResponse {is_alive, message}
    POST execute        {sandbox_id, command: str|list, timeout, cwd, env} -> CommandResponse
    POST create_session {sandbox_id, session, startup_source, env_enable, env, remote_user}
    POST run_in_session {sandbox_id, session, command, check, timeout} -> BashObservation
    POST close_session  {sandbox_id, session}
    POST read_file      {sandbox_id, path, encoding, errors} -> ReadFileResponse {content}
    POST write_file     {sandbox_id, path, content} -> WriteFileResponse
    POST upload         multipart: file, target_path, sandbox_id -> UploadResponse
    POST stop           {sandbox_id}
    POST delete         {sandbox_id}

Mapping of ROCK's start request to corral's SandboxConfig (starting from the server's base config):

* ``image``: looked up in the server's ``images`` table (name -> rootfs directory, or None for the
  host's root). An image not in the table runs on the host's root filesystem, read-only (corral's
  default); the requested name is echoed back as ``image`` in get_status and the mapping actually
  used is in ``result.corral.rootfs``. Clients can never name host directories themselves.
* ``memory`` ("8g", "512m", bytes without unit) -> ``limits.memory_mb``; ``limit_cpus`` (else
  ``cpus``) -> ``limits.cpus``. Above the server's ``max_cpus`` (16) or ``max_memory_mb`` (64g) the
  start is refused with ROCK's message ("Requested CPUs 20 exceed the maximum allowed 16"); within
  them, a CPU quota above the machine's CPUs is granted as all of them (``corral.cpus_granted``).
* ``num_gpus`` > 0 -> ``gpu=True``, only if the server allows GPUs; otherwise refused.
* ``auto_clear_time_minutes`` (or ``auto_clear_time``; ROCK's SDK sends its ``auto_clear_seconds``
  rounded up to minutes under both) or corral's own ``auto_clear_seconds``: the sandbox is stopped
  after that long without a request naming it (a command still running is not idleness); the
  server's ``idle_timeout_s`` caps it, and applies alone when the client sends none. Its events and
  findings stay readable.
* ``image_os`` must be "linux". ``disk``, ``auto_archive/delete_seconds``,
  ``registry_*``, ``use_kata_runtime``, ``accelerator_type`` are accepted and ignored.
* ``sandbox_id``: the id the client will use; corral's own sandbox id (the one in its event store)
  is ``result.corral.sandbox_id`` and may differ.

As ROCK (its rocklet and admin server are the reference, and its SDK the client):

* Every refusal or failure is HTTP 200 with a Failed envelope, ``result.code`` 4000 (the request) or
  5000 (the server) and the reason in ``error`` and ``result.failure_reason``: the SDK raises on any
  other status without reading the body. The status corral means is in ``corral.http_status``. Only a
  missing or wrong token is a plain 401.
* Sessions are interactive bash: a background job prints ``[1] <pid>`` (ROLL reads the pid from it),
  stderr is merged into stdout in the order written, and ``output`` has surrounding whitespace cut.
  A command with no timeout may run 295 s (the SDK gives up at 300 s). ``check="raise"`` (the
  default) turns a non-zero exit into a Failed envelope.
* ``create_session``: a ``startup_source`` file that is missing or fails is reported in ``output`` and
  the session works; creating a session that exists keeps it and succeeds.
* ``stop`` and ``delete`` of an unknown or deleted sandbox succeed; plain ``get_status`` reports a
  stopped sandbox as not found, ``include_all_states=true`` shows it; ``port_mapping`` is ``{}``
  (no port of a corral sandbox is published).

corral's own additions: findings ride along in an extra ``corral`` key of every result (``{"sandbox_id",
"step", "refused", "findings": [...], ...}``), which the SDK's models drop, and in the fields they
keep: run_in_session's ``failure_reason`` and execute's ``stderr`` name every finding the command
raised (a denied connection's ``egress-denied`` too, though the client's connect() succeeded against
corral's gateway). A command that corral's rules refuse runs nothing and reports exit code 126.
ROCK's SDK opens a session per session-less ``arun()`` and nobody closes it: past 16 idle such
``bash-<digits>`` sessions, corral closes the least recently used.

Deliberate differences: history expansion is off in sessions (ROCK's ``echo "hi!x"`` fails with
"event not found"); output lines end in ``\n``, not the pty's ``\r\n``; ``delete`` of a running
sandbox stops and deletes it (ROCK refuses); ``remote_user`` works on image sandboxes (the host's
root has one unprivileged user); restart, archive and commit answer a Failed envelope that says what to do instead.
"""

from __future__ import annotations

import re
import shlex
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from corral.errors import EpisodeEnded, FileAccessError, SandboxClosed, SandboxFrozen, SessionError
from corral.images import ImageError
from corral.sandbox.sandbox import ExecResult
from corral.server.state import (
    _ID_RE,
    MAX_UPLOAD,
    PREFIX,
    REFUSED_EXIT,
    ApiError,
    _Box,
    _envelope,
    _Server,
)


# -- request models (ROCK's field names; unknown fields are ignored, as ROCK's server does) ----------
class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


SandboxId = Annotated[str, Field(min_length=1, max_length=64)]


class StartRequest(_Req):
    image: str = Field("python:3.11", min_length=1, max_length=512)
    image_os: str = "linux"
    memory: str = "8g"
    cpus: float = Field(2, gt=0, le=1024)
    limit_cpus: float | None = Field(None, gt=0, le=1024)
    num_gpus: float | None = Field(None, ge=0)
    sandbox_id: str | None = Field(None, pattern=_ID_RE)
    # ROCK's SDK sends its auto_clear_seconds rounded up to minutes, under both names: stopped after that
    # long without a request. auto_clear_seconds is corral's own, for clients that want seconds.
    auto_clear_time_minutes: int | None = Field(None, ge=0)
    auto_clear_time: int | None = Field(None, ge=0)
    auto_clear_seconds: int | None = Field(None, ge=0)

    def idle_seconds(self) -> float | None:
        if self.auto_clear_seconds:
            return float(self.auto_clear_seconds)
        minutes = self.auto_clear_time_minutes or self.auto_clear_time
        return 60.0 * minutes if minutes else None


class CommandRequest(_Req):
    sandbox_id: SandboxId
    command: str | list[str]
    timeout: float | None = Field(1200, gt=0)
    env: dict[str, str] | None = None
    cwd: str | None = None


class _SessionReq(_Req):
    sandbox_id: SandboxId
    session: str = Field("default", min_length=1, max_length=128)


class CreateSessionRequest(_SessionReq):
    session_type: Literal["bash"] = "bash"
    startup_source: list[str] = []
    env_enable: bool = False
    env: dict[str, str] | None = None
    remote_user: str | None = None


class RunRequest(_SessionReq):
    action_type: Literal["bash"] = "bash"
    command: str
    check: Literal["silent", "raise", "ignore"] = "raise"
    timeout: float | None = Field(None, gt=0)


class CloseSessionRequest(_SessionReq):
    session_type: Literal["bash"] = "bash"


class ReadFileRequest(_Req):
    sandbox_id: SandboxId
    path: str = Field(min_length=1)
    encoding: str | None = None
    errors: str | None = None


class WriteFileRequest(_Req):
    sandbox_id: SandboxId
    path: str = Field(min_length=1)
    content: str


TEMP_SESSION = re.compile(r"^bash-\d{10,}$")  # the SDK's per-call session: f"bash-{time.time_ns()}"
MAX_IDLE_TEMP_SESSIONS = 16
SESSION_TIMEOUT = 295.0  # a command the client gave no timeout: ROCK's SDK itself gives up at 300 s
STARTUP_SOURCE_TIMEOUT = 30.0


def _failure_reason(error: str | None, findings: list[dict]) -> str:
    """What went wrong, in the field ROCK's SDK keeps (Observation.failure_reason): corral's refusal,
    and every finding this command raised, so a denied connection never looks like a quiet success."""
    parts = [error] if error else []
    parts += [f"corral finding {f['rule_id']} ({f['severity']}, {f['action']}): {f['title']}" for f in findings]
    return "; ".join(parts)


# -- routes ------------------------------------------------------------------------------------------
router = APIRouter(prefix=PREFIX)


@router.post("/start_async")
async def start_async(request: Request, req: StartRequest) -> dict:
    srv: _Server = request.app.state.corral
    assert srv.runtime is not None
    tenant = request.state.tenant
    mine = srv.boxes.setdefault(tenant, {})
    reserved = srv.reserved_ids.setdefault(tenant, set())
    if req.sandbox_id and (req.sandbox_id in mine or req.sandbox_id in reserved):
        raise ApiError(409, f"sandbox id {req.sandbox_id!r} is in use; delete it or choose another")
    cfg, rootfs = srv.config_for(req)
    with srv.hold(tenant):
        if req.sandbox_id:
            reserved.add(req.sandbox_id)
        try:
            try:
                sb = await srv.runtime.create(cfg)
            except ImageError as e:  # ROCK's words, then the registry's
                raise ApiError(400, f"Failed to pull image {req.image}: {e}") from None
            rootfs = str(sb.config.rootfs) if sb.config.rootfs else None  # an image's, once resolved
            rock_id = req.sandbox_id or sb.id
            b = _Box(rock_id, tenant, sb, req.image, rootfs, req.memory, cpus=req.limit_cpus or req.cpus)
            limits = [t for t in (req.idle_seconds(), srv.config.idle_timeout_s) if t]
            b.idle_limit = float(min(limits)) if limits else None
            mine[rock_id] = b
        finally:
            reserved.discard(req.sandbox_id or "")
    res = {"sandbox_id": rock_id, "host_name": srv.host_name, "host_ip": sb.net.ip if sb.net else None,
           "cpus": req.limit_cpus or req.cpus, "memory": req.memory,
           "corral": {**srv.corral(b), "rootfs": rootfs, "cpus_granted": cfg.limits.cpus}}
    return _envelope(res)


def status_of(srv: _Server, b: _Box) -> dict:
    state = "running" if b.alive else "deleted" if b.deleted else "stopped"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created))
    return {
        # no port of a corral sandbox is published: ROCK's container-port -> host-port map is empty
        "sandbox_id": b.rock_id, "is_alive": b.alive, "state": state, "image": b.image, "port_mapping": {},
        "status": {"sandbox": {"status": state,
                               "message": b.sb.terminated or f"corral sandbox {b.sb.id}"}},
        "host_name": srv.host_name, "host_ip": b.sb.net.ip if b.sb.net else None,
        "cpus": b.cpus or b.sb.config.limits.cpus, "memory": b.memory, "create_time": iso, "start_time": iso,
        "stop_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.stopped)) if b.stopped else None,
        "corral": {**srv.corral(b), "rootfs": b.rootfs, "sessions": b.sb.sessions() if b.alive else [],
                   "cpus_granted": b.sb.config.limits.cpus},
    }


@router.get("/get_status")
async def get_status(request: Request, sandbox_id: SandboxId, include_all_states: bool = False) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, sandbox_id, running=False, deleted=include_all_states)
    if not b.alive and not include_all_states:  # as ROCK: a stopped sandbox is only listed when asked for
        raise ApiError(404, f"Sandbox {sandbox_id} not found (it is stopped; ask with include_all_states=true)",
                       corral=srv.corral(b))
    return _envelope(status_of(srv, b))


@router.get("/is_alive")
async def is_alive(request: Request, sandbox_id: SandboxId) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, sandbox_id, running=False)
    return _envelope({"is_alive": b.alive, "message": srv.host_name if b.alive else "stopped"})


async def guarded(srv: _Server, b: _Box, coro: Any) -> Any:
    b.busy += 1
    try:
        return await coro
    except (SandboxClosed, SandboxFrozen, EpisodeEnded) as e:
        raise ApiError(409, str(e), corral=srv.corral(b)) from None
    finally:
        b.busy -= 1
        b.last_used = time.monotonic()


@router.post("/execute")
async def execute(request: Request, req: CommandRequest) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, req.sandbox_id)
    cmd = req.command if isinstance(req.command, str) else shlex.join(req.command)
    if not cmd.strip():
        raise ApiError(422, "invalid request: command: must not be empty")
    r: ExecResult = await guarded(srv, b, b.sb.exec(cmd, timeout=req.timeout, env=req.env, cwd=req.cwd))
    info = srv.corral(b, r)
    if r.timed_out:
        return _envelope(failed=f"command timed out after {req.timeout}s", message="execute command failed",
                         corral=info)
    code = REFUSED_EXIT if r.refused else r.exit_code
    stderr = r.error if r.refused else r.stderr
    findings = _failure_reason(None, info["findings"])
    if findings:  # ROCK's CommandResponse has no failure_reason: stderr is the field its SDK keeps
        stderr = f"{stderr or ''}{'' if not stderr or stderr.endswith(chr(10)) else chr(10)}[{findings}]\n"
    return _envelope({"stdout": r.stdout, "stderr": stderr, "exit_code": code, "corral": info})


@router.post("/create_session")
async def create_session(request: Request, req: CreateSessionRequest) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, req.sandbox_id)
    if req.session in b.sb.sessions():  # as ROCK: the existing session is kept, and the call succeeds
        return _envelope({"session_type": "bash", "output": "", "corral": srv.corral(b)})
    if TEMP_SESSION.match(req.session):
        await _close_idle_temp_sessions(b)
    try:
        await guarded(srv, b, b.sb.create_session(req.session, env=req.env, interactive=True,
                                                  user=req.remote_user or None))
    except SessionError as e:
        raise ApiError(422 if req.remote_user else 409, str(e)) from None
    outputs = []
    try:
        for src in req.startup_source:
            # as ROCK: a file that is missing or fails is reported in the output, and the session works
            r = await guarded(srv, b, b.sb.run_in_session(req.session, f"source {shlex.quote(src)}",
                                                          timeout=STARTUP_SOURCE_TIMEOUT))
            outputs.append(r.stdout + r.stderr)
    except BaseException:
        await b.sb.close_session(req.session)  # never a half-made session that a retry would collide with
        raise
    return _envelope({"session_type": "bash", "output": "".join(outputs).strip(), "corral": srv.corral(b)})


async def _close_idle_temp_sessions(b: _Box) -> None:
    """ROCK's SDK opens a session per session-less arun() call and never closes it (nor does ROCK):
    past MAX_IDLE_TEMP_SESSIONS of them idle, the least recently used are closed, so a long loop of such
    calls cannot exhaust the sandbox's process limit. One in use (a nohup poll's) is never closed."""
    idle = [n for n in b.sb.sessions() if TEMP_SESSION.match(n) and n not in b.running_sessions]
    idle.sort(key=lambda n: b.session_used.get(n, 0.0))
    for name in idle[:max(0, len(idle) - MAX_IDLE_TEMP_SESSIONS + 1)]:
        await b.sb.close_session(name)
        b.session_used.pop(name, None)


@router.post("/run_in_session")
async def run_in_session(request: Request, req: RunRequest) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, req.sandbox_id)
    if req.session not in b.sb.sessions():
        raise ApiError(404, f"no session {req.session!r} in sandbox {req.sandbox_id}; call create_session first")
    timeout = req.timeout or SESSION_TIMEOUT
    b.running_sessions.add(req.session)
    try:
        r = await guarded(srv, b, b.sb.run_in_session(req.session, req.command, timeout=timeout))
    except SessionError as e:
        raise ApiError(404, str(e)) from None
    finally:
        b.running_sessions.discard(req.session)
        b.session_used[req.session] = time.monotonic()
    info = srv.corral(b, r)
    failure = _failure_reason(r.error, info["findings"])
    if r.timed_out:
        return _envelope(failed=f"timeout after {timeout:g} seconds while running command {req.command!r}"
                                + (f" ({failure})" if failure else ""),
                         message="run in session failed", corral=info)
    code = REFUSED_EXIT if r.refused else r.exit_code
    # as ROCK's terminal: one stream, leading and trailing whitespace cut
    output = (r.error or "") if r.refused else (r.stdout + r.stderr).strip()
    if req.check == "raise" and code != 0:
        return _envelope(failed=f"Command {req.command!r} failed with exit code {code}. "
                                f"Here is the output:\n{output!r}" + (f" ({failure})" if failure else ""),
                         message="run in session failed", corral=info)
    if req.check == "ignore":
        code = None
    return _envelope({"session_type": "bash", "output": output, "exit_code": code,
                      "failure_reason": failure, "expect_string": "", "corral": info})


@router.post("/close_session")
async def close_session(request: Request, req: CloseSessionRequest) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, req.sandbox_id)
    if req.session not in b.sb.sessions():
        raise ApiError(404, f"no session {req.session!r} in sandbox {req.sandbox_id}")
    await b.sb.close_session(req.session)
    return _envelope({"session_type": "bash", "corral": srv.corral(b)})


@router.post("/read_file")
async def read_file(request: Request, req: ReadFileRequest) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, req.sandbox_id)
    try:
        data = await guarded(srv, b, b.sb.read_file(req.path, as_step=True))
    except FileAccessError as e:
        return _envelope(failed=str(e), message="read file failed", corral=srv.corral(b))
    try:
        content = data.decode(req.encoding or "utf-8", req.errors or "strict")
    except LookupError as e:
        raise ApiError(422, f"invalid request: encoding/errors: {e}") from None
    except UnicodeDecodeError as e:
        return _envelope(failed=f"{req.path} is not valid {e.encoding}: {e.reason}; pass errors='replace'",
                         message="read file failed", corral=srv.corral(b))
    return _envelope({"content": content, "corral": srv.corral(b)})


@router.post("/write_file")
async def write_file(request: Request, req: WriteFileRequest) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, req.sandbox_id)
    try:
        await guarded(srv, b, b.sb.write_file(req.path, req.content, as_step=True))
    except FileAccessError as e:
        return _envelope({"success": False, "message": str(e)}, failed=str(e), message="write file failed",
                         corral=srv.corral(b))
    return _envelope({"success": True, "message": f"Successfully write content to file {req.path}",
                      "corral": srv.corral(b)})


@router.post("/upload")
async def upload(request: Request, file: Annotated[UploadFile, File()], target_path: Annotated[str, Form()],
                 sandbox_id: Annotated[SandboxId, Form()]) -> dict:
    srv: _Server = request.app.state.corral
    b = srv.box(request.state.tenant, sandbox_id)
    if not target_path.strip():
        raise ApiError(422, "invalid request: target_path: must not be empty")
    data = await file.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        raise ApiError(413, f"upload is larger than {MAX_UPLOAD >> 20} MiB; split it or use execute")
    name = file.filename or ""
    try:
        await guarded(srv, b, b.sb.write_file(target_path, data, as_step=True))
    except FileAccessError as e:
        return _envelope(failed=str(e), message="upload file failed", corral=srv.corral(b))
    return _envelope({"success": True, "message": f"Successfully uploaded file {name} to {target_path}",
                      "file_name": name, "corral": srv.corral(b)})


async def _end(request: Request, sandbox_id: str, *, delete: bool) -> dict:
    """stop and delete; as ROCK, ending what is not there (any more) is done already."""
    srv: _Server = request.app.state.corral
    done = f"{sandbox_id} {'deleted' if delete else 'stopped'}"
    b = srv.find(request.state.tenant, sandbox_id)
    if b is None:
        return _envelope(done)
    await srv.stop_box(b)
    if delete:
        b.deleted = True
        srv.boxes[request.state.tenant].pop(sandbox_id, None)
        srv.deleted.setdefault(request.state.tenant, []).append(b)
    return _envelope(done, corral=srv.corral(b))


@router.post("/stop")
async def stop(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
    return await _end(request, sandbox_id, delete=False)


@router.post("/delete")
async def delete(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
    return await _end(request, sandbox_id, delete=True)


# ROCK's container-image and object-storage routes. A corral sandbox is namespaces over tmpfs,
# not a container: there is no image to snapshot, nothing of a stopped sandbox to start again,
# and no bucket. The SDK's restart(), archive(), commit() and its upload's storage-token probe
# get a Failed envelope (as ROCK answers a refused request: the SDK drops the body of an HTTP
# error) that says so and what to do instead.
def unsupported(request: Request, sandbox_id: str, what: str) -> dict:
    srv: _Server = request.app.state.corral
    # a refusal is not use: the idle clock and the findings not yet handed out stay as they were
    b = srv.box(request.state.tenant, sandbox_id, running=False, deleted=True, touch=False)
    return _envelope(failed=f"{what} (sandbox {sandbox_id!r})", message=what, corral={"sandbox_id": b.sb.id})


@router.get("/get_token")
async def get_token() -> dict:
    msg = "corral has no object storage: upload sends files straight into the sandbox"
    return _envelope(failed=msg, message=msg)


@router.post("/restart")
async def restart(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
    return unsupported(request, sandbox_id, "restart is not supported: a corral sandbox is not a container, "
                       "and stopping it ended its processes and freed its tmpfs; start a new one with "
                       "start_async and write or upload the files it needs")


@router.post("/sandboxes/{sandbox_id}/archive")
async def archive(request: Request, sandbox_id: SandboxId) -> dict:
    return unsupported(request, sandbox_id, "archive is not supported: a corral sandbox has no container "
                       "image or logs to upload; read the files you need before stopping it, and fetch "
                       "its findings from GET /findings (they outlive the sandbox)")


@router.post("/commit")
async def commit(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
    return unsupported(request, sandbox_id, "commit is not supported: a corral sandbox is not a container "
                       "and has no image to push; give new sandboxes their files with write_file or upload")


@router.get("/commit/{sandbox_id}")
async def commit_status(request: Request, sandbox_id: SandboxId) -> dict:
    return unsupported(request, sandbox_id, "commit is not supported, so there is no commit status")

