"""Every code block of README.md, checked against the code, so the README cannot drift from it again.

- ```python blocks run as pasted: each in a fresh interpreter (this project's), in a temporary
  directory that holds only a link to the source tree's `examples/` (the README's paths are the
  repository root's), with a timeout. Sandboxes need root and a private network namespace, which
  `make test` provides.
- ```yaml blocks parse, and the ones that are corral's files (their first line names the file:
  `# sandbox.yaml`, `# serve.yaml`, `# corral.yaml`, `# task.yaml`, `# ...rules.yaml`) load with
  corral's own loader for that file. A directory the example names that this machine lacks
  (`/srv/rootfs/py311`, `./task`) is the only thing stood in for: by an empty one.
- ```sh blocks and the block under "## CLI": every `corral ...` command names real subcommands, and
  every option it shows is in that subcommand's `--help`.

A block that cannot run as pasted by nature (a model server, a GPU, a download, a running `corral
serve`, a fragment inside an `async def`) is skipped only where the README marks it, on the line
before the block, with `<!-- readme-test: skip (why) -->`; the README's text says so too. A skipped
Python block is still compiled, and its imports from corral must exist. Nothing is skipped silently.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_SCRIPT = Path(sys.executable).with_name("corral")
CORRAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "corral.cli"]
RUN_TIMEOUT = 90  # seconds for one Python block (the suite's own per-test limit is 120)

MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]*\S[^)]*)\)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    section: str  # the "## " heading it is under
    skip: str | None  # the README's reason, from its marker

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'text'}"


def _blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    out: list[Block] = []
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = FENCE.match(line)
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: a code block that is never closed"
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mk = MARKER.match(prev)
        out.append(Block(i + 1, m["lang"], "\n".join(lines[i + 1:end]) + "\n", section, mk["why"] if mk else None))
        i = end + 1
    return out


BLOCKS = _blocks()


def _of(*langs: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang in langs]


def test_markers_are_well_formed_and_placed() -> None:
    """A marker the test would not see (misspelt, or not right before a block) must not pass unnoticed."""
    lines = README.read_text().splitlines()
    marked = {b.line for b in BLOCKS if b.skip}
    for n, line in enumerate(lines, 1):
        if "readme-test" not in line:
            continue
        assert MARKER.match(line.strip()), f"README.md:{n}: write a marker as <!-- readme-test: skip (why) -->"
        nxt = next((k for k in range(n, len(lines)) if lines[k].strip()), None)
        assert nxt is not None and nxt + 1 in marked, f"README.md:{n}: a marker must be the line before a block"


def test_every_block_is_checked() -> None:
    """Blocks in a language this test does not know, or unlabelled blocks that look like code, would
    go unchecked: each block says what it is."""
    for b in BLOCKS:
        assert b.lang in ("python", "sh", "bash", "yaml", ""), f"README.md:{b.line}: no check for ```{b.lang}"
        if b.lang == "" and b.section != "CLI":
            code = [ln for ln in b.text.splitlines() if re.match(r"(\$ |corral |import |from \S+ import )", ln)]
            assert not code, f"README.md:{b.line}: label this block (```sh, ```python) so it is checked: {code}"
    assert [b for b in BLOCKS if b.lang == "" and b.section == "CLI"], "the CLI block under '## CLI' is gone"


# -- Python -------------------------------------------------------------------------------------------
def _check_corral_imports(b: Block) -> None:
    """Compile the block (top-level await allowed: a fragment may use it) and import what it takes
    from corral: a fragment's imports must exist even when it cannot run here."""
    tree = compile(b.text, f"README.md:{b.line}", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "corral":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "corral":
            mod = importlib.import_module(node.module or "")
            for alias in node.names:
                if not hasattr(mod, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, or the error


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """Where a block runs: nothing but the source tree's examples (the README's paths are the root's)."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


@pytest.mark.parametrize("block", _of("python"), ids=lambda b: b.id)
def test_python_block(block: Block, scratch: Path) -> None:
    _check_corral_imports(block)
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    (scratch / "snippet.py").write_text(block.text)
    env = dict(os.environ, CORRAL_HOME=str(scratch / ".corral"), PYTHONUNBUFFERED="1")
    try:
        r = subprocess.run([sys.executable, "snippet.py"], cwd=scratch, env=env, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"README.md:{block.line}: still running after {RUN_TIMEOUT}s\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0, f"README.md:{block.line} does not run as pasted:\n{r.stdout}\n{r.stderr}"


# -- YAML ---------------------------------------------------------------------------------------------
NOT_CORRALS = {"prometheus.yml"}  # YAML of other tools, shown for use with corral: parsed only


def _loader(name: str):
    from corral.agent.tasks import load_task
    from corral.config import RuntimeConfig, SandboxConfig
    from corral.detect import rules
    from corral.server.config import ServeConfig

    if name == "sandbox.yaml":
        return SandboxConfig.from_file
    if name == "serve.yaml":
        return ServeConfig.from_file
    if name == "corral.yaml":
        return RuntimeConfig.from_file
    if name == "task.yaml":
        return lambda path: load_task(Path(path).parent)
    if name.endswith("rules.yaml"):
        return lambda path: rules.load([Path(path)])
    return None


MISSING = re.compile(r"(\S+) (?:is not a directory|does not exist)")


def _load(load, text: str, where: Path, host: Path) -> object:
    """Load with corral's loader. A directory the example names and this machine lacks is stood in
    for by an empty one (a relative one made where the file is loaded; an absolute one replaced by one
    under `host`, which is no place a sandbox config refuses, as /tmp is), and the file loaded again;
    anything else the loader refuses fails the test."""
    from corral.errors import ConfigError

    where.mkdir()
    f = where / "task.yaml"  # a task's file must have this name; the others are loaded by path
    for _ in range(10):
        f.write_text(text)
        try:
            return load(f)
        except ConfigError as e:
            m = MISSING.search(str(e))
            path = m[1] if m else ""
            if not path or path == "/" or path.lstrip("./") not in text or Path(path).exists():
                raise
            if path.startswith("/"):
                stand_in = host / path.strip("/")
                stand_in.mkdir(parents=True, exist_ok=True)
                text = text.replace(path, str(stand_in))
            else:
                (Path.cwd() / path).mkdir(parents=True)
    raise AssertionError("too many missing directories")


@pytest.mark.parametrize("block", _of("yaml"), ids=lambda b: b.id)
def test_yaml_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(block.text)
    assert data is not None, f"README.md:{block.line}: an empty YAML block"
    first = block.text.splitlines()[0]
    m = re.match(r"#\s*(\S+\.ya?ml)\b", first)
    assert m, f"README.md:{block.line}: start the block with a comment naming its file (# sandbox.yaml ...)"
    name = m[1].rstrip(",")
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    if name in NOT_CORRALS:
        return
    load = _loader(name)
    assert load is not None, (f"README.md:{block.line}: {name} is no corral file this test knows; add its "
                              "loader here, or to NOT_CORRALS if it is another tool's")
    monkeypatch.chdir(tmp_path)
    host = Path(tempfile.mkdtemp(prefix="corral-readme-", dir="/var/tmp"))
    try:
        _load(load, block.text, tmp_path / "cfg", host)
    finally:
        shutil.rmtree(host, ignore_errors=True)


# -- shell and the CLI --------------------------------------------------------------------------------
@functools.cache
def _help(*path: str) -> str:
    r = subprocess.run([*CORRAL, *path, "--help"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, COLUMNS="250", NO_COLOR="1", TERM="dumb"))
    assert r.returncode == 0, f"`corral {' '.join(path)}` is no command: {r.stdout}{r.stderr}"
    return r.stdout


def _is_group(path: tuple[str, ...]) -> bool:
    return bool(re.search(r"^Commands:|─ Commands ─", _help(*path), re.M))


def _has_option(help_text: str, opt: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text) is not None


OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _check(words: list[str], where: str, prefix: tuple[str, ...] = ()) -> list[str]:
    """The subcommand path at the head of `words` (after `corral`), then every option in the rest:
    problems found, as text. A word `a|b|c` in a subcommand's place names alternatives, one of which
    must have each option."""
    paths: list[tuple[str, ...]] = [prefix]
    i = 0
    while i < len(words) and re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", words[i]) and (
            not paths[0] or _is_group(paths[0])):
        paths = [(*p, alt) for p in paths for alt in words[i].split("|")]
        i += 1
    problems = []
    rest = words[i:]
    if "--" in rest:  # `corral run ... -- CMD`: the command's own options are not corral's
        rest = rest[: rest.index("--")]
    for w in rest:
        for opt in OPTION.findall(w.split("=", 1)[0]):
            # alternatives (`baseline show|accept|reset ... [--episode ID]`): one of them has it
            if not any(_has_option(_help(*p), opt) for p in paths):
                problems.append(f"{where}: `corral {' | '.join(' '.join(p) for p in paths)}` has no option {opt}")
    return problems


def _corral_lines(text: str) -> list[str]:
    """The logical lines (continuations joined) of a shell block that run corral."""
    logical, buf = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    return [ln for ln in logical if re.match(r"\s*(\w+=\S*\s+)*(\S*/)?corral(\s|$)", ln)]


@pytest.mark.parametrize("block", _of("sh", "bash"), ids=lambda b: b.id)
def test_shell_block(block: Block) -> None:
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    problems = []
    for line in _corral_lines(block.text):
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"\w+=\S*", words[0]):
            words.pop(0)  # VAR=value before the command
        problems += _check(words[1:], f"README.md:{block.line} `{line.strip()}`")
    assert not problems, "\n".join(problems)


def _cli_entries(text: str) -> list[str]:
    """The README's CLI summary: each entry is a `corral ...` line and its `[...]` continuation lines;
    the indented prose (and what follows three spaces on a command line) is description."""
    entries: list[str] = []
    for line in text.splitlines():
        head = re.split(r"\s{3,}", line.strip())[0]
        if line.startswith("corral"):
            entries.append(head)
        elif line.strip().startswith("[") and entries:
            entries[-1] += " " + head
    return entries


def test_cli_block() -> None:
    (block,) = [b for b in BLOCKS if b.lang == "" and b.section == "CLI"]
    problems = []
    entries = _cli_entries(block.text)
    assert len(entries) > 10, entries
    for entry in entries:
        segments = [s.split() for s in entry.split(" | ")]
        first = [w.strip("[]").rstrip(".").strip("[]") for w in segments[0][1:]]
        problems += _check(first, f"CLI block `{entry}`")
        for seg in segments[1:]:  # `corral images ls | rm NAME | prune`: siblings of the first's command
            group = tuple(w for w in segments[0][1:2])
            problems += _check(seg, f"CLI block `{entry}`", prefix=group)
    assert not problems, "\n".join(problems)


def test_cheap_commands(tmp_path: Path) -> None:
    """What the README's CLI block lists first, run for real: the version, and doctor's verdict."""
    import corral

    env = dict(os.environ, CORRAL_HOME=str(tmp_path), COLUMNS="200")
    r = subprocess.run([*CORRAL, "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert (r.returncode, r.stdout.strip()) == (0, f"corral {corral.__version__}"), r.stderr
    r = subprocess.run([*CORRAL, "doctor"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "All required features are available" in r.stdout, r.stdout + r.stderr
