"""Which files in a sandbox a download tool wrote, so that running one is seen for what it is.

Ingress tool transfer (ATT&CK T1105) is usually two moves: fetch a file, then run it. An agent
spreads them over tool calls as readily as it chains them with `&&` (`curl -o /tmp/t URL`, then
`chmod +x /tmp/t; /tmp/t` in the next step), where a rule over one command line cannot see both.
So when curl or wget is about to run, corral notes where its output goes: its `-o`/`-O` target
resolved against its working directory, or the file its stdout was redirected to. A later exec of
that file, as the program itself or as the script an interpreter is given, carries the download's
step and tool in its event (`proc.downloaded`), whichever step it happens in.

A download tool is only one way to fetch. perl, node, Tcl or Python open the socket themselves just
as well (`perl -e '...IO::Socket...' > /tmp/p.py`). So corral also knows the last process that wrote
each file on the sandbox's writable mounts (monitor/writers.py), and a file about to run whose writer
received bytes through the gateway before it wrote it counts as fetched too, with how it was fetched
(`via`):

- `downloader`: curl or wget as above, or another program whose job is fetching (lwp-download,
  aria2c, busybox wget, ...);
- `inline`: an interpreter given its code inline (-c, -e, standard input): a download cradle;
- `program`: any other program, a script file of the agent's say, as a project's bootstrap script that
  fetches a tool and runs it would be; only for a transfer that ended within SLACK_S of the write, as
  a long-running program writes many things. It is evidence for review, not an act to end an episode
  for.

A file written by a package manager or a version-control tool is not counted: fetching code and
running it is their job. Nor is a file unpacked from a downloaded archive or passed on through a
pipe (`python3 -c ... | tee x.sh`: its writer received nothing), nor one written by a forked child
that never exec'd (its writer has no exec record).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from corral.bounded import Recent
from corral.events import Event

DOWNLOADERS = frozenset({"curl", "wget"})
# Programs whose job is fetching a file, besides the two whose arguments are read above.
FETCHERS = DOWNLOADERS | frozenset({"lwp-download", "lwp-request", "GET", "aria2c", "axel", "http", "https",
                                    "xh", "tftp", "ftp", "lftp", "ncftpget", "socat", "nc", "ncat", "netcat"})
# Package managers and version control: they write what they fetch, and run it, all day.
PACKAGE_TOOLS = frozenset({
    "pip", "pip3", "pipx", "uv", "poetry", "pdm", "hatch", "conda", "mamba", "micromamba", "easy_install",
    "npm", "npx", "npm-cli.js", "npx-cli.js", "yarn", "yarn.js", "pnpm", "pnpm.cjs", "corepack", "bun",
    "cargo", "rustup", "go", "gem", "bundle", "bundler", "composer", "mvn", "gradle", "sbt", "dotnet",
    "apt", "apt-get", "dpkg", "git", "git-remote-http", "git-remote-https", "hg", "svn", "helm"})
INTERPRETERS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "perl", "ruby", "node", "php", "tclsh", "wish"})
MAX_TRACKED = 4096
# a file counts as the download if it was last changed between the downloader's start and shortly
# after its last transfer ended (it writes the final buffer after the connection closes)
SLACK_S = 2.0
# Options that take a value, so that the value is never mistaken for a URL (curl 7.88's and wget
# 1.21's --help; -o/-O/--output/--output-dir/--url and wget's -O/-P are read, not skipped).
_CURL_VALUED = frozenset("AbcCdDeEFHKmoPQrtTuUwxXyYz")
_CURL_LONG_VALUED = frozenset("""
    abstract-unix-socket alt-svc aws-sigv4 cacert capath cert cert-type ciphers config connect-timeout
    connect-to continue-at cookie cookie-jar create-file-mode crlfile curves data data-ascii data-binary
    data-raw data-urlencode delegation dns-interface dns-ipv4-addr dns-ipv6-addr dns-servers doh-url
    dump-header egd-file engine etag-compare etag-save expect100-timeout form form-string ftp-account
    ftp-alternative-to-user ftp-method ftp-port ftp-ssl-ccc-mode happy-eyeballs-timeout-ms header hostpubmd5
    hostpubsha256 hsts interface json keepalive-time key key-type krb libcurl limit-rate local-port
    login-options mail-auth mail-from mail-rcpt max-filesize max-redirs max-time netrc-file noproxy
    oauth2-bearer parallel-max pass pinnedpubkey proto proto-default proto-redir proxy proxy-cacert
    proxy-capath proxy-cert proxy-cert-type proxy-ciphers proxy-crlfile proxy-header proxy-key
    proxy-key-type proxy-pass proxy-pinnedpubkey proxy-service-name proxy-tls13-ciphers proxy-tlsauthtype
    proxy-tlspassword proxy-tlsuser proxy-user pubkey quote random-file range rate referer request
    request-target resolve retry retry-delay retry-max-time sasl-authzid service-name socks4 socks4a socks5
    socks5-gssapi-service socks5-hostname speed-limit speed-time stderr telnet-option tftp-blksize
    time-cond tls-max tls13-ciphers tlsauthtype tlspassword tlsuser trace trace-ascii unix-socket
    upload-file url-query user user-agent variable write-out""".split())  # noqa: SIM905 (a word list reads better)
_WGET_VALUED = frozenset("OoaPeiUTtwQBlARDIXn")  # -n takes the rest of its word (-nv, -nd)
_WGET_LONG_VALUED = frozenset("""
    execute output-file append-output report-speed input-file base config rejected-log tries
    retry-on-http-error start-pos progress timeout dns-timeout connect-timeout read-timeout wait waitretry
    quota bind-address limit-rate restrict-file-names prefer-family user password use-askpass
    local-encoding remote-encoding cut-dirs http-user http-password default-page header compression
    proxy-user proxy-password referer user-agent load-cookies save-cookies post-data post-file method
    body-data body-file secure-protocol certificate certificate-type private-key private-key-type
    ca-certificate ca-directory crl-file pinnedpubkey ciphers ftp-user ftp-password warc-file warc-header
    warc-max-size warc-dedup warc-tempdir level backups accept reject accept-regex reject-regex regex-type
    domains exclude-domains follow-tags ignore-tags include-directories exclude-directories""".split())  # noqa: SIM905


def _is_interpreter(name: str) -> bool:
    return name in INTERPRETERS or name.startswith(("python", "tclsh"))


def program_of(exe: str | None, argv: list[str]) -> tuple[str, bool]:
    """What a process runs, by name: an interpreter's script or `-m` module, a busybox applet, else
    its executable; and whether an interpreter was given its code inline (-c/-e, standard input)."""
    name = os.path.basename(exe or (argv[0] if argv else ""))
    if name == "busybox" and argv:
        applet = os.path.basename(argv[0])
        return (argv[1] if applet == "busybox" and len(argv) > 1 else applet), False
    if not _is_interpreter(name):
        return name, False
    script = script_arg(name, argv)
    if script:
        return os.path.basename(script), False
    if name.startswith("python") and "-m" in argv[1:]:
        module = argv[argv.index("-m", 1) + 1:][:1]
        return (module[0].split(".")[0] if module else name), False
    return name, True


def fetched_origin(path: str, step: int | None, exe: str | None, argv: list[str], written_at: float,
                   transfers: list[float]) -> dict | None:
    """Where a file came from if its last writer fetched it: the writer (its step, executable and
    argv, from its exec record), when the write was seen, and when each of the writer's transfers
    that received bytes ended. None if the writer is a package manager or version control, or
    received nothing before the write. A download tool or a one-liner counts whenever its transfer
    ended before it wrote (what else would it write?); a program of the agent's only for a
    transfer that ended within SLACK_S of the write."""
    tool, inline = program_of(exe, argv)
    if tool in PACKAGE_TOOLS:
        return None
    via = "downloader" if tool in FETCHERS else "inline" if inline else "program"
    if via == "program":
        fetched = any(abs(t - written_at) <= SLACK_S for t in transfers)
    else:
        fetched = any(t <= written_at + SLACK_S for t in transfers)
    return {"path": path, "step": step, "tool": tool, "command": None, "via": via} if fetched else None


def _next_word(argv: list[str], i: int) -> tuple[int, str]:
    """An option's value given as the word after it: (that word's index, the word)."""
    i += 1
    return i, (argv[i] if i < len(argv) else "")


def _url_name(url: str) -> str | None:
    """The file name a URL's path ends in ("" when it ends in "/"); None when it is no URL at all."""
    try:
        return posixpath.basename(urlsplit(url).path)
    except ValueError:
        return None


def _words(argv: list[str], short_valued: frozenset[str], long_valued: frozenset[str],
           ) -> Iterator[tuple[str | None, str]]:
    """getopt-style reading of argv[1:]: (option, value) per option ("o" or "output"; value "" when
    it takes none), (None, word) per operand. A value is the rest of a short option's word or the
    next word, or a long option's `=value` or the next word."""
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            yield from ((None, w) for w in argv[i + 1:])
            return
        if a.startswith("--"):
            opt, eq, val = a[2:].partition("=")
            if opt in long_valued and not eq:
                i, val = _next_word(argv, i)
            yield opt, val
        elif a.startswith("-") and len(a) > 1:
            for j, c in enumerate(a[1:], 1):
                if c not in short_valued:
                    yield c, ""
                    continue
                val = a[j + 1:]
                if not val:
                    i, val = _next_word(argv, i)
                yield c, val
                break
        else:
            yield None, a
        i += 1


def curl_outputs(argv: list[str]) -> tuple[list[str], bool]:
    """Files curl writes (as given: relative to its cwd or --output-dir), and whether some
    transfer goes to stdout. Each -o/-O takes the next URL in order, as curl pairs them; a URL
    left without one goes to stdout, or to its own name under --remote-name-all."""
    specs: list[str | None] = []  # in order: an -o file, or None for -O (the URL's own name)
    urls: list[str] = []
    outdir = ""
    all_remote = False
    for opt, val in _words(argv, _CURL_VALUED, _CURL_LONG_VALUED | {"output", "output-dir", "url"}):
        if opt is None or opt == "url":
            urls.append(val)
        elif opt in ("o", "output"):
            specs.append(val)
        elif opt in ("O", "remote-name"):
            specs.append(None)
        elif opt == "remote-name-all":
            all_remote = True
        elif opt == "output-dir":
            outdir = val
    outs: list[str] = []
    stdout = False
    for n, url in enumerate(urls):
        spec = specs[n] if n < len(specs) else (None if all_remote else "-")
        if spec == "-":
            stdout = True
        elif spec is None:
            name = _url_name(url)
            if name:
                outs.append(name)
        else:
            outs.append(spec)
    return [posixpath.join(outdir, o) if outdir and not o.startswith("/") else o for o in outs], stdout


def wget_outputs(argv: list[str]) -> tuple[list[str], bool]:
    """Files wget writes (as given), and whether it writes to stdout (-O -)."""
    document: str | None = None
    prefix = ""
    urls: list[str] = []
    for opt, val in _words(argv, _WGET_VALUED, _WGET_LONG_VALUED | {"output-document", "directory-prefix"}):
        if opt is None:
            urls.append(val)
        elif opt in ("O", "output-document"):
            document = val
        elif opt in ("P", "directory-prefix"):
            prefix = val
    if document is not None:
        return ([], True) if document == "-" else ([document], False)
    names = [n or "index.html" for n in (_url_name(u) for u in urls) if n is not None]
    return [posixpath.join(prefix, n) if prefix else n for n in names], False


def script_arg(name: str, argv: list[str]) -> str | None:
    """The script file a shell or interpreter is asked to run, or None (code given inline with -c/-e,
    a module with -m, standard input, or no script). Options that take a value are skipped whole."""
    if name.startswith("python"):
        inline, valued = ("-c", "-m"), ("-W", "-X", "-Q")
    elif name in ("sh", "bash", "dash", "zsh", "ksh"):
        inline, valued = ("-c", "-s"), ("-o", "+o", "-O", "+O", "--rcfile", "--init-file")
    elif name == "node":
        inline, valued = ("-e", "-p", "--eval", "--print"), ("-r", "--require", "--import", "--loader")
    elif name in ("perl", "ruby"):
        inline, valued = ("-e", "-E"), ("-I", "-r", "-C")
    elif name == "php":
        inline, valued = ("-r",), ("-d", "-c")
    elif name.startswith(("tclsh", "wish")):
        inline, valued = (), ("-encoding",)
    else:
        return None
    args = iter(argv[1:])
    for a in args:
        if a == "--":
            return next(args, None)
        if a in valued:
            next(args, None)
        elif a in inline or (name in ("sh", "bash", "dash", "zsh", "ksh") and a[:1] == "-" and "c" in a[1:]
                             and not a.startswith("--")):
            return None
        elif name == "php" and a == "-f":
            return next(args, None)
        elif not a.startswith(("-", "+")):
            return a
    return None


class Downloads:
    """One sandbox's downloads: absolute path (as the sandbox sees it) -> where it came from.

    A path counts as downloaded only if the downloader did receive something (`received` says when
    its last allowed transfer ended) and the file was last changed while it ran. A download that
    failed, a file the agent wrote itself after one, or a file rewritten since, is not "downloaded".
    """

    def __init__(self) -> None:
        self.files: Recent[str, dict] = Recent(MAX_TRACKED)

    def clear(self) -> None:
        self.files.clear()

    def note(self, ev: Event, pid: int) -> None:
        """A downloader was allowed to run: remember the files it was told to write."""
        name = os.path.basename(ev.exe or "")
        if name not in DOWNLOADERS or not ev.argv:
            return
        outs, stdout = (curl_outputs if name == "curl" else wget_outputs)(ev.argv)
        cwd = ev.data.get("cwd") or "/"
        paths = [posixpath.normpath(posixpath.join(cwd, o)) for o in outs]
        if stdout:  # `curl URL > file`: the shell opened the file before this exec
            paths.append(_fd_path(pid, 1))
        for path in paths:
            if not path.startswith("/") or path.startswith(("/dev/", "/proc/")):
                continue
            self.files[path] = {"path": path, "step": ev.step, "tool": name, "command": ev.command,
                                "pid": pid, "started": ev.ts, "via": "downloader"}

    def origin(self, ev: Event, received: Callable[[int | None, int], float | None],
               fetched: Callable[[str, int], dict | None] = lambda _path, _pid: None) -> dict | None:
        """The download this exec runs (as the program, or as the script or standard input of a shell
        or interpreter), or None. `received(step, pid)`: when that downloader's last allowed
        transfer with bytes received ended, or None if it received nothing. `fetched(path, pid)`:
        the origin of a file (as `pid` sees it) whose last writer fetched it (fetched_origin), for a
        file no downloader was told to write."""
        if not ev.pid:
            return None
        name = os.path.basename(ev.exe or "")
        candidates = [ev.exe]
        if _is_interpreter(name):
            script = script_arg(name, ev.argv or [])
            if script is not None:
                candidates.append(posixpath.normpath(posixpath.join(ev.data.get("cwd") or "/", script)))
            else:
                candidates.append(_fd_path(ev.pid, 0))  # `bash < script`
        for path in candidates:
            d = self.files.get(path or "")
            if d is None:
                if path and (f := fetched(path, ev.pid)) is not None:
                    return f
                continue
            ended = received(d["step"], d["pid"])
            try:  # through the running process's own root: the sandbox's view of the path
                mtime = os.stat(f"/proc/{ev.pid}/root{path}").st_mtime
            except OSError:
                continue
            if ended is not None and d["started"] - SLACK_S <= mtime <= ended + SLACK_S:
                return {k: d[k] for k in ("path", "step", "tool", "command", "via")}
        return None


def _fd_path(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""
