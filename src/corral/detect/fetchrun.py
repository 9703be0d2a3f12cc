"""A file fetched and then run, read off one command line the way the shell will run it: a download
tool writing a path, and a later simple command of the same line executing that path (as the program,
as a shell's or interpreter's script, or sourced). It is the intent that matters: the fetch may be
refused by the egress policy and the file never arrive, and the line is still a dropper. Spelled with
any download tool, wrapper (`timeout 10 python3 f`) or operator, where a regex over the text saw only
`curl`/`wget` right before `&& sh f`.

Download tools and where they write: curl (-o/--output, -O/--remote-name: the URL's last segment),
wget and busybox wget (-O/--output-document, else the URL's last segment), lwp-download (URL [FILE]),
aria2c (-o, under -d), fetch (-o), httpie (`http --download -o`)."""

from __future__ import annotations

import functools
import posixpath
from urllib.parse import urlsplit

from corral.detect.command import CODE_READERS, SHELLS, SHORT_LINE, SOURCING, peel, split

_URL_SCHEMES = ("http://", "https://", "ftp://", "ftps://", "tftp://", "scp://", "sftp://")
# options of each tool that take the output path; the tool's other options that take a value are skipped
_OUT = {"curl": ("-o", "--output"), "wget": ("-O", "--output-document"), "aria2c": ("-o", "--out"),
        "fetch": ("-o", "--output"), "http": ("-o", "--output"), "https": ("-o", "--output")}
_REMOTE_NAME = {"curl": ("-O", "--remote-name", "--remote-name-all")}
# single-letter options of these tools that take no value, so may come before -o/-O in one cluster
_FLAGS = frozenset("fsSLkivqNcnxgGjlpRZ46")
_DEFAULT_NAME = frozenset({"wget", "aria2c", "lwp-download"})  # no output option: the URL's last segment


def _url_name(url: str) -> str | None:
    path = urlsplit(url).path
    name = posixpath.basename(path)
    return name or None


def _fetched(argv: list[str]) -> list[str]:
    """The paths a download tool's argv writes."""
    if not argv:
        return []
    name = posixpath.basename(argv[0])
    urls = [a for a in argv[1:] if a.startswith(_URL_SCHEMES)]
    if not urls:
        return []
    out: list[str] = []
    outs = _OUT.get(name, ())
    for i, a in enumerate(argv[1:], 1):
        for opt in outs:
            if a == opt and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif a.startswith(opt + "=") and opt.startswith("--"):
                out.append(a.split("=", 1)[1])
            elif len(opt) == 2 and len(a) > 2 and (k := _cluster_at(a, opt[1])) > 0:
                # a cluster of flags ending in the option (`-fsSLo FILE`, `-qO FILE`) or carrying its value (`-oFILE`)
                value = a[k + 1:] or (argv[i + 1] if i + 1 < len(argv) else "")
                if value:
                    out.append(value)
    if name == "aria2c":
        d = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-d", "--dir")), None)
        out = [posixpath.join(d, o) if d else o for o in out]
    if name == "lwp-download":
        args = [a for a in argv[1:] if not a.startswith("-")]
        out += args[1:2] if len(args) > 1 else []
    remote = any(a in _REMOTE_NAME.get(name, ()) or (name == "curl" and _cluster_at(a, "O") > 0) for a in argv[1:])
    if remote or (name in _DEFAULT_NAME and not out):
        out += [n for n in map(_url_name, urls) if n]
    return [o for o in out if o not in ("-", "/dev/null", "/dev/stdout")]


def _cluster_at(arg: str, letter: str) -> int:
    """Where option `letter` stands in a cluster of flags that take no value (`-sSfO`: 4), or -1 (not a
    cluster, or the letter is inside another option's value: `-HOrigin:x`)."""
    if arg[:1] != "-" or arg[1:2] == "-":
        return -1
    k = arg.find(letter, 1)
    return k if k > 0 and set(arg[1:k]) <= _FLAGS else -1


def _run_paths(argv: list[str]) -> list[str]:
    """The file a simple command executes: the program itself, a shell's or interpreter's script, or a
    sourced file (not `-c` code, `-m` modules or an interpreter reading standard input)."""
    if not argv:
        return []
    name = posixpath.basename(argv[0])
    if name in SOURCING:
        return argv[1:2]
    if name in CODE_READERS or name.startswith(("python", "perl", "ruby", "node", "php")):
        for a in argv[1:]:
            if a in ("-c", "-e", "-m", "-E", "--eval", "-") or (name in SHELLS and a == "-n"):
                return []  # code on the line, a module, standard input; `sh -n` only reads for syntax
            if not a.startswith("-"):
                return [a]
            if name in SHELLS and a == "-o":  # -o OPTION
                continue
        return []
    return [argv[0]] if "/" in argv[0] else []


def _norm(path: str) -> str:
    return posixpath.normpath(path)


def fetch_then_run(line: str) -> tuple[str, ...]:
    """The paths `line` fetches with a download tool and later runs (see the module's docstring). Asked
    once per simple command of a line: kept as command.split keeps its parse (a long line only while
    it is judged, so a stream of long lines cannot fill the cache)."""
    return _fetch_then_run_long(line) if len(line) > SHORT_LINE else _fetch_then_run_short(line)


@functools.lru_cache(maxsize=256)
def _fetch_then_run_short(line: str) -> tuple[str, ...]:
    return _fetch_then_run(line)


@functools.lru_cache(maxsize=8)
def _fetch_then_run_long(line: str) -> tuple[str, ...]:
    return _fetch_then_run(line)


def _fetch_then_run(line: str) -> tuple[str, ...]:
    fetched: dict[str, str] = {}
    hits: list[str] = []
    for c in split(line):
        argv = peel(c.argv)
        if argv and posixpath.basename(argv[0]) == "busybox":
            argv = argv[1:]
        for p in _run_paths(argv):
            n = _norm(p)
            if n in fetched or ("/" not in n and n in fetched.values()):  # a bare name, run after a cd
                hits.append(p)
        for p in _fetched(argv):
            fetched[_norm(p)] = posixpath.basename(_norm(p))
    return tuple(dict.fromkeys(hits))
