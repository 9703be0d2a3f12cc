/* corral's in-sandbox agent, native build: the same process, protocol and guarantees as agent.py
 * (read its docstring first), in a static binary of its own. One Python interpreter per sandbox was
 * most of an idle sandbox's memory and of its cold start; this agent costs a few hundred KiB, and the
 * binary's pages are shared by every sandbox that binds the same file.
 *
 * Guarantees kept, each as in agent.py:
 * - not dumpable from its first instruction; PID 1 of the sandbox (bwrap --as-pid-1), reaping orphans;
 * - every child announces itself on the shared SEQPACKET socket (the kernel stamps its host pid,
 *   SO_PASSCRED) and blocks on a private gate pipe until the host has placed it and says go;
 * - the exec filter (seccomp user notification) is installed by this thread before anything is
 *   forked; if it cannot be installed, `ready` carries no listener and the host refuses the sandbox;
 * - a session shell's streams are sockets, which cannot be reopened through /proc/<pid>/fd;
 * - corral's own writes walk the path without following any link and rename a temporary file in.
 *
 * Built by corral/sandbox/native.py (cc -static); agent.py stays the fallback where no C compiler is.
 *
 * The same binary is also corral's launcher (`--corral-launch`, see launcher()): it runs on the host
 * between corral's spawn and bwrap, so corral spawns it with vfork instead of running Python in a
 * forked copy of itself. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <grp.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536
#define DRAIN_GRACE 0.05
#define RECV_MAX (1 << 20)

/* ---- small buffers ------------------------------------------------------------------------- */
typedef struct { char *p; size_t n, cap; } Buf;

static void die_oom(void) { static const char m[] = "corral agent: out of memory\n"; (void)!write(2, m, sizeof m - 1); _exit(70); }

static void buf_add(Buf *b, const void *d, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) die_oom();
        b->p = p; b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void buf_s(Buf *b, const char *s) { buf_add(b, s, strlen(s)); }
static void buf_f(Buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap; va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}
static void buf_drop(Buf *b, size_t n) { memmove(b->p, b->p + n, b->n - n); b->n -= n; if (b->p) b->p[b->n] = 0; }
static void buf_free(Buf *b) { free(b->p); b->p = NULL; b->n = b->cap = 0; }
static void *xcalloc(size_t n, size_t s) { void *p = calloc(n, s); if (!p) die_oom(); return p; }
static char *xstrdup(const char *s) { char *p = strdup(s); if (!p) die_oom(); return p; }

/* ---- JSON: just what the protocol uses ----------------------------------------------------- */
enum { J_NULL, J_BOOL, J_NUM, J_STR, J_OBJ, J_ARR };
typedef struct Json {
    int t;
    long long num;
    char *s; size_t slen;          /* J_STR (NUL-terminated; slen counts an embedded NUL) */
    int n; char **keys; struct Json *vals;  /* J_OBJ (keys) and J_ARR */
} Json;

typedef struct { const char *p, *end; int err; } Parser;

static void ws(Parser *ps) { while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++; }

static void utf8(Buf *b, unsigned cp) {
    char o[4]; size_t n;
    if (cp < 0x80) { o[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) { o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F)); n = 3; }
    else { o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 0x3F)); o[2] = (char)(0x80 | (cp >> 6 & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F)); n = 4; }
    buf_add(b, o, n);
}

static int hex4(Parser *ps, unsigned *out) {
    if (ps->end - ps->p < 4) return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = *ps->p++;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static char *jstring(Parser *ps, size_t *len) {
    Buf b = {0};
    ps->p++; /* the opening quote */
    while (ps->p < ps->end && *ps->p != '"') {
        char c = *ps->p++;
        if (c != '\\') { buf_add(&b, &c, 1); continue; }
        if (ps->p >= ps->end) break;
        char e = *ps->p++;
        switch (e) {
        case 'n': buf_add(&b, "\n", 1); break;
        case 't': buf_add(&b, "\t", 1); break;
        case 'r': buf_add(&b, "\r", 1); break;
        case 'b': buf_add(&b, "\b", 1); break;
        case 'f': buf_add(&b, "\f", 1); break;
        case 'u': {
            unsigned cp, lo;
            if (hex4(ps, &cp)) { ps->err = 1; break; }
            if (cp >= 0xD800 && cp < 0xDC00 && ps->end - ps->p >= 6 && ps->p[0] == '\\' && ps->p[1] == 'u') {
                ps->p += 2;
                if (hex4(ps, &lo)) { ps->err = 1; break; }
                if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else { utf8(&b, cp); cp = lo; }
            }
            utf8(&b, cp);
            break;
        }
        default: buf_add(&b, &e, 1);
        }
    }
    if (ps->p >= ps->end) ps->err = 1; else ps->p++;
    if (!b.p) buf_add(&b, "", 0);
    *len = b.n;
    return b.p;
}

static void jparse(Parser *ps, Json *v, int depth);

static void jcontainer(Parser *ps, Json *v, int depth, char close) {
    int cap = 0;
    ps->p++;
    ws(ps);
    if (ps->p < ps->end && *ps->p == close) { ps->p++; return; }
    while (!ps->err) {
        if (v->n == cap) {
            cap = cap ? cap * 2 : 8;
            v->vals = realloc(v->vals, (size_t)cap * sizeof *v->vals);
            if (close == '}') v->keys = realloc(v->keys, (size_t)cap * sizeof *v->keys);
            if (!v->vals || (close == '}' && !v->keys)) die_oom();
        }
        ws(ps);
        if (close == '}') {
            size_t kl;
            if (ps->p >= ps->end || *ps->p != '"') { ps->err = 1; return; }
            v->keys[v->n] = jstring(ps, &kl);
            ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') { ps->err = 1; free(v->keys[v->n]); return; }
            ps->p++;
        }
        memset(&v->vals[v->n], 0, sizeof *v->vals);
        jparse(ps, &v->vals[v->n], depth + 1);
        v->n++;
        ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ps->p < ps->end && *ps->p == close) { ps->p++; return; }
        ps->err = 1;
    }
}

static void jparse(Parser *ps, Json *v, int depth) {
    ws(ps);
    if (ps->p >= ps->end || depth > 16) { ps->err = 1; return; }
    char c = *ps->p;
    if (c == '{') { v->t = J_OBJ; jcontainer(ps, v, depth, '}'); }
    else if (c == '[') { v->t = J_ARR; jcontainer(ps, v, depth, ']'); }
    else if (c == '"') { v->t = J_STR; v->s = jstring(ps, &v->slen); }
    else if (!strncmp(ps->p, "true", 4)) { v->t = J_BOOL; v->num = 1; ps->p += 4; }
    else if (!strncmp(ps->p, "false", 5)) { v->t = J_BOOL; ps->p += 5; }
    else if (!strncmp(ps->p, "null", 4)) { v->t = J_NULL; ps->p += 4; }
    else if (c == '-' || (c >= '0' && c <= '9')) {
        char *e;
        v->t = J_NUM;
        v->num = strtoll(ps->p, &e, 10);
        ps->p = e;
        while (ps->p < ps->end && strchr("0123456789.eE+-", *ps->p)) ps->p++;  /* no float is sent */
    } else ps->err = 1;
}

static void jfree(Json *v) {
    free(v->s);
    for (int i = 0; i < v->n; i++) { if (v->keys) free(v->keys[i]); jfree(&v->vals[i]); }
    free(v->keys); free(v->vals);
}

static Json *jget(Json *o, const char *key) {
    if (!o || o->t != J_OBJ) return NULL;
    for (int i = 0; i < o->n; i++) if (!strcmp(o->keys[i], key)) return &o->vals[i];
    return NULL;
}
/* a string field, or NULL when missing, null or empty */
static const char *jstr(Json *o, const char *key) {
    Json *v = jget(o, key);
    return v && v->t == J_STR && v->slen ? v->s : NULL;
}
static long long jnum(Json *o, const char *key, long long dflt) {
    Json *v = jget(o, key);
    return v && (v->t == J_NUM || v->t == J_BOOL) ? v->num : dflt;
}
static int jtrue(Json *o, const char *key) { return jnum(o, key, 0) != 0; }

static int valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        size_t k = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 9;
        if (k == 9 || i + k >= n + (k ? 0 : 1)) return 0;
        for (size_t j = 1; j <= k; j++) if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += k + 1;
    }
    return 1;
}

static void jesc(Buf *b, const char *s, size_t n) {
    /* UTF-8 passes as it is; anything else is escaped byte by byte, so the host's JSON never fails */
    int utf = valid_utf8((const unsigned char *)s, n);
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { buf_add(b, "\\", 1); buf_add(b, &s[i], 1); }
        else if (c < 0x20 || c == 0x7f) buf_f(b, "\\u%04x", c);
        else if (c >= 0x80 && !utf) buf_f(b, "\\u%04x", c);
        else buf_add(b, &s[i], 1);
    }
    buf_add(b, "\"", 1);
}

/* ---- base64 -------------------------------------------------------------------------------- */
static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void b64enc(Buf *b, const unsigned char *d, size_t n) {
    char o[4];
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)d[i] << 16 | (i + 1 < n ? (unsigned)d[i + 1] << 8 : 0) | (i + 2 < n ? d[i + 2] : 0);
        o[0] = B64[v >> 18 & 63]; o[1] = B64[v >> 12 & 63];
        o[2] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        o[3] = i + 2 < n ? B64[v & 63] : '=';
        buf_add(b, o, 4);
    }
}

static int b64dec(Buf *out, const char *s, size_t n) {
    unsigned v = 0; int bits = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        const char *p;
        if (c == '=') break;
        if (!c || !(p = strchr(B64, c))) return -1;
        v = v << 6 | (unsigned)(p - B64);
        bits += 6;
        if (bits >= 8) { bits -= 8; unsigned char o = (unsigned char)(v >> bits); buf_add(out, &o, 1); }
    }
    return 0;
}

/* ---- state --------------------------------------------------------------------------------- */
typedef struct Proc {
    char *key;
    pid_t pid;
    int pidfd, out_fd, err_fd, gate_w, stdin_w;
    int exited; int exit_code; double exited_at;
    long long sent[3], dropped[3], limit;
    char *session_cmd;
    char marker[64]; size_t marker_len;
    int merged, done_streams, has_status, status;
    Buf pending[3];
    Buf launch; int has_launch;
    int has_rusage; double cpu; long maxrss;
    Buf stdin_buf; int stdin_eof, stdin_watch;
    struct Proc *next;
} Proc;

typedef struct PutFile { char *key, *path, *tmp, *name; int dir_fd, fd, mode, failed; struct PutFile *next; } PutFile;

enum { W_SOCK = 1, W_PIDFD, W_PIPE, W_STDIN, W_SINK, W_SIG };

static int sock_fd = 3, ep, sig_fd;
static Proc *procs;
static PutFile *puts_;
static Json base_env;
static const char *shell = "/bin/sh", *workdir = "/workspace";
static int has_run_as; static uid_t run_uid; static gid_t run_gid;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (double)t.tv_sec + t.tv_nsec / 1e9; }

static void watch(int fd, int kind, uint32_t events) {
    struct epoll_event e = {.events = events, .data.u64 = (uint64_t)kind << 32 | (uint32_t)fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
}
static void unwatch(int fd) { epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL); }

static void send_buf(Buf *b) {
    /* a plain send(): no address, so the exec filter does not stop it */
    while (send(sock_fd, b->p, b->n, 0) < 0 && errno == EINTR) {}
    buf_free(b);
}

static void send_error(const char *id, const char *what) {
    Buf b = {0};
    buf_s(&b, "{\"op\":\"error\",\"id\":");
    if (id) jesc(&b, id, strlen(id)); else buf_s(&b, "null");
    buf_s(&b, ",\"error\":");
    jesc(&b, what, strlen(what));
    buf_s(&b, "}");
    send_buf(&b);
}

static void send_exit_err(const char *id, const char *err) {
    Buf b = {0};
    buf_s(&b, "{\"op\":\"exit\",\"id\":");
    jesc(&b, id, strlen(id));
    buf_s(&b, ",\"code\":null,\"error\":");
    jesc(&b, err, strlen(err));
    buf_s(&b, "}");
    send_buf(&b);
}

static void send_exit_ok(const char *id) {
    Buf b = {0};
    buf_s(&b, "{\"op\":\"exit\",\"id\":");
    jesc(&b, id, strlen(id));
    buf_s(&b, ",\"code\":0}");
    send_buf(&b);
}

static Proc *find(const char *key) {
    for (Proc *p = procs; p; p = p->next) if (!strcmp(p->key, key)) return p;
    return NULL;
}
static Proc *by_fd(int fd, int *stream) {
    for (Proc *p = procs; p; p = p->next) {
        if (p->out_fd == fd) { *stream = 1; return p; }
        if (p->err_fd == fd) { *stream = 2; return p; }
    }
    return NULL;
}
static void unlink_proc(Proc *q) {
    for (Proc **pp = &procs; *pp; pp = &(*pp)->next) if (*pp == q) { *pp = q->next; return; }
}
static void free_proc(Proc *p) {
    for (int i = 0; i < 3; i++) buf_free(&p->pending[i]);
    buf_free(&p->launch); buf_free(&p->stdin_buf);
    free(p->key); free(p->session_cmd); free(p);
}

/* ---- the launch spec a child reads from its gate: cwd, user, argc, argv..., env... (NUL-ended) -- */
static int overridden(const char *key, const char **over) {
    for (; over && *over; over++) if (!strncmp(*over, key, strlen(key)) && (*over)[strlen(key)] == '=') return 1;
    return 0;
}
/* the base environment, then `extra`'s, then `over` ("K=V" strings), each name once */
static void spec_env(Buf *b, Json *extra, const char **over) {
    for (int i = 0; i < base_env.n; i++) {
        if (base_env.vals[i].t != J_STR || jget(extra, base_env.keys[i]) || overridden(base_env.keys[i], over)) continue;
        buf_f(b, "%s=", base_env.keys[i]); buf_add(b, base_env.vals[i].s, strlen(base_env.vals[i].s) + 1);
    }
    if (extra && extra->t == J_OBJ)
        for (int i = 0; i < extra->n; i++) {
            if (extra->vals[i].t != J_STR || overridden(extra->keys[i], over)) continue;
            buf_f(b, "%s=", extra->keys[i]); buf_add(b, extra->vals[i].s, strlen(extra->vals[i].s) + 1);
        }
    for (; over && *over; over++) buf_add(b, *over, strlen(*over) + 1);
}
static void spec_head(Buf *b, const char *cwd, const char *user, int argc, const char **argv) {
    buf_add(b, cwd, strlen(cwd) + 1);
    buf_add(b, user ? user : "", strlen(user ? user : "") + 1);
    buf_f(b, "%d", argc); buf_add(b, "", 1);
    for (int i = 0; i < argc; i++) buf_add(b, argv[i], strlen(argv[i]) + 1);
}

/* ---- the child, between fork and exec ------------------------------------------------------ */
static void child_fail(const char *argv0, const char *why, int code) {
    Buf b = {0};
    buf_f(&b, "corral: cannot start %s: %s\n", argv0, why);
    (void)!write(2, b.p, b.n);
    _exit(code);
}

/* the user's entry in the sandbox's own /etc/passwd (no NSS: the image's files are the truth) */
static int lookup_user(const char *user, uid_t *uid, gid_t *gid, char *home, size_t hl) {
    FILE *f = fopen("/etc/passwd", "re");
    char line[4096];
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        char *fields[7] = {0}, *s = line, *tok;
        int n = 0;
        line[strcspn(line, "\n")] = 0;
        while (n < 7 && (tok = strsep(&s, ":"))) fields[n++] = tok;
        if (n >= 6 && !strcmp(fields[0], user)) {
            *uid = (uid_t)strtoul(fields[2], NULL, 10); *gid = (gid_t)strtoul(fields[3], NULL, 10);
            snprintf(home, hl, "%s", fields[5]);
            fclose(f);
            return 0;
        }
    }
    fclose(f);
    return -1;
}
static int user_groups(const char *user, gid_t primary, gid_t *out, int max) {
    int n = 0;
    out[n++] = primary;
    FILE *f = fopen("/etc/group", "re");
    char line[8192];
    if (!f) return n;
    while (fgets(line, sizeof line, f) && n < max) {
        char *fields[4] = {0}, *s = line, *tok;
        int k = 0;
        line[strcspn(line, "\n")] = 0;
        while (k < 4 && (tok = strsep(&s, ":"))) fields[k++] = tok;
        if (k < 4) continue;
        for (char *m = fields[3]; (tok = strsep(&m, ","));)
            if (!strcmp(tok, user)) { gid_t g = (gid_t)strtoul(fields[2], NULL, 10); if (g != primary) out[n++] = g; break; }
    }
    fclose(f);
    return n;
}

static void close_except(int a, int b) {
    int lo = a < b ? a : b, hi = a < b ? b : a;
    if (lo > 3) syscall(SYS_close_range, 3, lo - 1, 0);
    if (hi > lo + 1) syscall(SYS_close_range, lo + 1, hi - 1, 0);
    syscall(SYS_close_range, hi + 1, ~0U, 0);
}

static void __attribute__((noreturn)) child_main(const char *key, int in_r, int out_w, int err_w, int gate_r,
                                                 int join_fd) {
    if (join_fd >= 0) {  /* into the cgroup corral chose, before anything else: "0" is this process */
        while (write(join_fd, "0", 1) < 0 && errno == EINTR) {}
        close(join_fd);  /* a failure leaves us where we are: corral checks, and moves us by pid */
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGCHLD, SIG_DFL); signal(SIGINT, SIG_DFL); signal(SIGPIPE, SIG_DFL);
    setsid();
    dup2(in_r, 0); dup2(out_w, 1); dup2(err_w, 2);
    /* hold nothing of the agent's: an inherited write end of another command's stdin, or our own
       gate, would keep that pipe from ever reading EOF */
    int g = gate_r > 2 ? gate_r : fcntl(gate_r, F_DUPFD_CLOEXEC, 3), s = sock_fd;
    if (s <= 2) s = fcntl(sock_fd, F_DUPFD_CLOEXEC, 3);
    close_except(g, s);
    Buf m = {0};
    buf_s(&m, "{\"op\":\"spawned\",\"id\":"); jesc(&m, key, strlen(key)); buf_s(&m, "}");
    while (send(s, m.p, m.n, 0) < 0 && errno == EINTR) {}  /* stamped with our host pid (SO_PASSCRED) */
    Buf spec = {0};
    char chunk[65536];
    for (;;) {
        ssize_t n = read(g, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        buf_add(&spec, chunk, (size_t)n);
    }
    if (!spec.n) _exit(126);  /* the agent went away, or the host refused us */
    syscall(SYS_close_range, 3, ~0U, 0);
    /* parse: cwd, user, argc, argv..., env... */
    char *p = spec.p, *end = spec.p + spec.n;
    const char *cwd = p; p += strlen(p) + 1;
    const char *user = p; p += strlen(p) + 1;
    int argc = atoi(p); p += strlen(p) + 1;
    char **argv = xcalloc((size_t)argc + 1, sizeof *argv);
    for (int i = 0; i < argc && p < end; i++) { argv[i] = p; p += strlen(p) + 1; }
    int envc = 0;
    for (char *q = p; q < end; q += strlen(q) + 1) envc++;
    char **env = xcalloc((size_t)envc + 4, sizeof *env);
    int ei = 0;
    for (; p < end; p += strlen(p) + 1) env[ei++] = p;
    const char *argv0 = argv[0] ? argv[0] : "?";
    if (chdir(cwd) < 0) {
        Buf e = {0};
        buf_f(&e, "corral: cannot cd to %s: %s\n", cwd, strerror(errno));
        (void)!write(2, e.p, e.n);
        _exit(126);
    }
    if (*user) {
        /* a user the sandbox's own /etc/passwd names, as `su USER -c bash` would start it */
        uid_t uid; gid_t gid; char home[1024]; gid_t groups[256];
        if (lookup_user(user, &uid, &gid, home, sizeof home) < 0) {
            char why[300];
            snprintf(why, sizeof why, "no user %s in the sandbox's /etc/passwd", user);
            child_fail(argv0, why, 127);
        }
        int ng = user_groups(user, gid, groups, 256);
        if (setgroups((size_t)ng, groups) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid))
            child_fail(argv0, strerror(errno), 127);
        char *h = xcalloc(1, strlen(home) + 6), *u = xcalloc(1, strlen(user) + 6), *l = xcalloc(1, strlen(user) + 9);
        sprintf(h, "HOME=%s", home); sprintf(u, "USER=%s", user); sprintf(l, "LOGNAME=%s", user);
        const char *over[3] = {h, u, l};
        for (int k = 0; k < 3; k++) {
            size_t kl = strchr(over[k], '=') - over[k] + 1;
            int j = 0;
            for (; j < ei; j++) if (!strncmp(env[j], over[k], kl)) break;
            env[j] = (char *)over[k];
            if (j == ei) ei++;
        }
    } else if (has_run_as) {
        if (setgroups(0, NULL) || setresgid(run_gid, run_gid, run_gid) || setresuid(run_uid, run_uid, run_uid))
            child_fail(argv0, strerror(errno), 127);
    }
    /* the program is looked up on the PATH of its own environment, as Python's os.execvpe does */
    for (int j = 0; j < ei; j++) if (!strncmp(env[j], "PATH=", 5)) { setenv("PATH", env[j] + 5, 1); break; }
    execvpe(argv0, argv, env);
    char why[600];
    snprintf(why, sizeof why, "[Errno %d] %s: '%s'", errno, strerror(errno), argv0);
    child_fail(argv0, why, 127);
    _exit(127);
}

/* ---- starting children --------------------------------------------------------------------- */
static int channel(int sockets, int fds[2]) {
    if (sockets) return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
    return pipe2(fds, O_CLOEXEC);
}

static Proc *fork_child(const char *key, int sockets, int join_fd) {
    int out[2], err[2], gate[2], in[2];
    if (channel(sockets, out)) return NULL;
    if (channel(sockets, err)) { close(out[0]); close(out[1]); return NULL; }
    if (pipe2(gate, O_CLOEXEC)) { close(out[0]); close(out[1]); close(err[0]); close(err[1]); return NULL; }
    if (channel(sockets, in)) { close(out[0]); close(out[1]); close(err[0]); close(err[1]); close(gate[0]); close(gate[1]); return NULL; }
    pid_t pid = fork();
    if (pid == 0) child_main(key, in[0], out[1], err[1], gate[0], join_fd);
    close(out[1]); close(err[1]); close(gate[0]); close(in[0]);
    if (pid < 0) { close(out[0]); close(err[0]); close(gate[1]); close(in[1]); return NULL; }
    Proc *p = xcalloc(1, sizeof *p);
    p->key = xstrdup(key);
    p->pid = pid;
    p->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    p->out_fd = out[0]; p->err_fd = err[0]; p->gate_w = gate[1]; p->stdin_w = in[1];
    p->limit = 1 << 20;
    p->next = procs; procs = p;
    if (p->pidfd >= 0) watch(p->pidfd, W_PIDFD, EPOLLIN);
    fcntl(out[0], F_SETFL, O_NONBLOCK); fcntl(err[0], F_SETFL, O_NONBLOCK); fcntl(in[1], F_SETFL, O_NONBLOCK);
    watch(out[0], W_PIPE, EPOLLIN); watch(err[0], W_PIPE, EPOLLIN);
    return p;
}

static void launch(Proc *p) {
    if (p->gate_w < 0 || !p->has_launch) return;
    size_t off = 0;
    while (off < p->launch.n) {  /* a pipe holds 64 KiB; the child is reading */
        ssize_t n = write(p->gate_w, p->launch.p + off, p->launch.n - off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        off += (size_t)n;
    }
    close(p->gate_w);
    p->gate_w = -1;
}

static void write_stdin(Proc *p);
static void feed_stdin(Proc *p, const char *d, size_t n, int eof) {
    /* buffered and written as the command reads: a command that ignores its stdin never blocks us */
    if (p->stdin_w < 0) return;
    buf_add(&p->stdin_buf, d, n);
    p->stdin_eof |= eof;
    write_stdin(p);
}

static void write_stdin(Proc *p) {
    int fd = p->stdin_w;
    if (fd < 0) return;
    while (p->stdin_buf.n) {
        ssize_t n = write(fd, p->stdin_buf.p, p->stdin_buf.n < CHUNK ? p->stdin_buf.n : CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        if (n < 0) { p->stdin_buf.n = 0; p->stdin_eof = 1; break; }  /* the command closed its stdin */
        buf_drop(&p->stdin_buf, (size_t)n);
    }
    int want = p->stdin_buf.n > 0;
    if (want && !p->stdin_watch) watch(fd, W_STDIN, EPOLLOUT);
    else if (!want && p->stdin_watch) unwatch(fd);
    p->stdin_watch = want;
    if (!want && p->stdin_eof) { close(fd); p->stdin_w = -1; }
}

static Proc *spawn(const char *key, Buf *spec, int stdin_data, int keep_stdin, int sockets, int join_fd) {
    Proc *p = fork_child(key, sockets, join_fd);
    if (!p) return NULL;
    p->launch = *spec; p->has_launch = 1;
    memset(spec, 0, sizeof *spec);
    if (!keep_stdin && !stdin_data) feed_stdin(p, "", 0, 1);
    return p;
}

/* ---- requests ------------------------------------------------------------------------------ */
static void shquote(Buf *b, const char *s) {
    buf_s(b, "'");
    for (; *s; s++) { if (*s == '\'') buf_s(b, "'\"'\"'"); else buf_add(b, s, 1); }
    buf_s(b, "'");
}

static void session_run(Json *m, const char *id) {
    Proc *p = find(jstr(m, "sid") ? jstr(m, "sid") : "");
    if (!p || p->exited) { send_exit_err(id, "session is not running"); return; }
    unsigned char nonce[8];
    char hex[17];
    if (getrandom(nonce, sizeof nonce, 0) != sizeof nonce) { send_exit_err(id, "no randomness for the marker"); return; }
    for (int i = 0; i < 8; i++) sprintf(hex + 2 * i, "%02x", nonce[i]);
    free(p->session_cmd);
    p->session_cmd = xstrdup(id);
    p->marker_len = (size_t)snprintf(p->marker, sizeof p->marker, "\x1e__CORRAL_%s__", hex);
    p->done_streams = 0;
    for (int i = 0; i < 3; i++) { p->pending[i].n = 0; p->sent[i] = p->dropped[i] = 0; }
    p->limit = jnum(m, "max_output", p->limit);
    p->merged = jtrue(m, "merge");
    Buf s = {0};
    Json *env = jget(m, "env");
    if (env && env->t == J_OBJ)
        for (int i = 0; i < env->n; i++)
            if (env->vals[i].t == J_STR) { buf_f(&s, "export %s=", env->keys[i]); shquote(&s, env->vals[i].s); buf_s(&s, "; "); }
    /* eval of the command as one quoted word: a syntax error in it is an error, never a hung shell,
       and no program runs but the command's own; </dev/null keeps commands from reading (and eating)
       the session's own command stream */
    buf_s(&s, "__corral_cmd="); shquote(&s, jstr(m, "cmd") ? jstr(m, "cmd") : "");
    buf_s(&s, "\n{ ");
    if (jstr(m, "cwd")) { buf_s(&s, "cd "); shquote(&s, jstr(m, "cwd")); buf_s(&s, " && "); }
    buf_s(&s, "eval \"$__corral_cmd\"\n} </dev/null");
    if (p->merged) buf_s(&s, " 2>&1");
    buf_f(&s, "\n__corral_rc=$?; printf '\\036__CORRAL_%s__%%d\\n' \"$__corral_rc\"; printf '\\036__CORRAL_%s__\\n' >&2\n", hex, hex);
    feed_stdin(p, s.p, s.n, 0);
    buf_free(&s);
}

static int walk(const char *path, int *dir_fd, char **name, char *err, size_t el);
static void put_data(const char *key, const char *data, size_t dlen, int eof);
static void own(int dir_fd, const char *name) {
    if (has_run_as) fchownat(dir_fd, name, run_uid, run_gid, AT_SYMLINK_NOFOLLOW);
}
static void put_failed(const char *key, const char *path, const char *why) {
    char e[4200];
    snprintf(e, sizeof e, "%s: %s", path, why);
    send_exit_err(key, e);
}

static void do_put(Json *m, const char *key) {
    const char *path = jstr(m, "path") ? jstr(m, "path") : "", *kind = jstr(m, "kind") ? jstr(m, "kind") : "file";
    int dir_fd; char *name; char why[1200];
    if (walk(path, &dir_fd, &name, why, sizeof why) < 0) { put_failed(key, path, why); return; }
    Json *modev = jget(m, "mode");
    int has_mode = modev && modev->t == J_NUM;
    if (!strcmp(kind, "dir")) {
        if (mkdirat(dir_fd, name, 0755) == 0) own(dir_fd, name);
        else {
            struct stat st;
            if (errno != EEXIST) { put_failed(key, path, strerror(errno)); goto out; }
            if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) || !S_ISDIR(st.st_mode)) { put_failed(key, path, "exists and is not a directory"); goto out; }
        }
        if (has_mode) {
            int fd = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (fd < 0 || fchmod(fd, (mode_t)(modev->num & 07777))) { put_failed(key, path, strerror(errno)); if (fd >= 0) close(fd); goto out; }
            close(fd);
        }
        send_exit_ok(key);
    } else if (!strcmp(kind, "symlink")) {
        if (symlinkat(jstr(m, "target") ? jstr(m, "target") : "", dir_fd, name)) { put_failed(key, path, strerror(errno)); goto out; }
        own(dir_fd, name);
        send_exit_ok(key);
    } else {
        int mode = has_mode ? (int)modev->num : -1;
        if (mode < 0) {  /* an existing file keeps its mode */
            struct stat st;
            mode = fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) ? (int)(st.st_mode & 07777) : 0644;
        }
        unsigned char r[6]; char tmp[32];
        if (getrandom(r, sizeof r, 0) != sizeof r) { put_failed(key, path, "no randomness"); goto out; }
        snprintf(tmp, sizeof tmp, ".corral-put-%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2], r[3], r[4], r[5]);
        int fd = openat(dir_fd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) { put_failed(key, path, strerror(errno)); goto out; }
        PutFile *f = xcalloc(1, sizeof *f);
        f->key = xstrdup(key); f->path = xstrdup(path); f->tmp = xstrdup(tmp); f->name = xstrdup(name);
        f->dir_fd = dir_fd; f->fd = fd; f->mode = mode & 07777;
        f->next = puts_; puts_ = f;
        free(name);
        Json *d = jget(m, "data");
        put_data(key, d && d->t == J_STR ? d->s : "", d && d->t == J_STR ? d->slen : 0, jtrue(m, "eof"));
        return;
    }
out:
    free(name);
    close(dir_fd);
}

static void putfile_close(PutFile *f, int keep) {
    if (f->fd >= 0) close(f->fd);
    if (!keep) unlinkat(f->dir_fd, f->tmp, 0);
    if (f->dir_fd >= 0) close(f->dir_fd);
    f->fd = f->dir_fd = -1;
}
static void putfile_forget(PutFile *f) {
    for (PutFile **pp = &puts_; *pp; pp = &(*pp)->next) if (*pp == f) { *pp = f->next; break; }
    free(f->key); free(f->path); free(f->tmp); free(f->name); free(f);
}

static void put_data(const char *key, const char *data, size_t dlen, int eof) {
    PutFile *f = puts_;
    while (f && strcmp(f->key, key)) f = f->next;
    if (!f) return;
    if (f->failed) { if (eof) putfile_forget(f); return; }  /* failed earlier: the rest is dropped */
    Buf raw = {0};
    const char *why = NULL;
    if (b64dec(&raw, data, dlen) < 0) why = "the data is not base64";
    for (size_t off = 0; !why && off < raw.n;) {
        ssize_t n = write(f->fd, raw.p + off, raw.n - off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) why = strerror(errno); else off += (size_t)n;
    }
    buf_free(&raw);
    if (!why && !eof) return;
    if (!why && ((has_run_as && fchown(f->fd, run_uid, run_gid)) || fchmod(f->fd, (mode_t)f->mode)
                 || renameat(f->dir_fd, f->tmp, f->dir_fd, f->name)))
        why = strerror(errno);
    if (!why) {
        putfile_close(f, 1);
        char *k = xstrdup(key);
        putfile_forget(f);
        send_exit_ok(k);
        free(k);
        return;
    }
    putfile_close(f, 0);
    f->failed = 1;
    put_failed(key, f->path, why);
    if (eof) putfile_forget(f);
}

/* the directory that will hold `path` (opened, created where missing) and the final name; each
   component is opened with O_NOFOLLOW relative to the one before: a link on the way is an error */
static int walk(const char *path, int *dir_fd, char **name, char *err, size_t el) {
    *name = NULL;
    if (path[0] != '/') { snprintf(err, el, "an absolute path without '..' is needed"); return -1; }
    char *copy = xstrdup(path), *parts[512];
    int n = 0;
    for (char *s = copy, *tok; (tok = strsep(&s, "/"));) {
        if (!*tok || !strcmp(tok, ".")) continue;
        if (!strcmp(tok, "..") || n == 512) { free(copy); snprintf(err, el, "an absolute path without '..' is needed"); return -1; }
        parts[n++] = tok;
    }
    if (!n) { free(copy); snprintf(err, el, "an absolute path without '..' is needed"); return -1; }
    const int DIRF = O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
    int fd = open("/", DIRF);
    Buf where = {0};
    for (int i = 0; i < n - 1; i++) {
        buf_s(&where, "/"); buf_s(&where, parts[i]);
        int nfd = openat(fd, parts[i], DIRF);
        if (nfd < 0 && errno == ENOENT) { mkdirat(fd, parts[i], 0755); nfd = openat(fd, parts[i], DIRF); }
        if (nfd < 0) {
            struct stat st;
            if (errno == ENOTDIR || errno == ELOOP) {
                int link = fstatat(fd, parts[i], &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode);
                snprintf(err, el, link ? "%s is a symbolic link (corral writes through none)" : "%s is not a directory", where.p);
            } else snprintf(err, el, "%s", strerror(errno));
            close(fd); free(copy); buf_free(&where);
            return -1;
        }
        close(fd);
        fd = nfd;
    }
    *dir_fd = fd;
    *name = xstrdup(parts[n - 1]);
    free(copy); buf_free(&where);
    return 0;
}

static void handle(Json *m, int fd) {
    const char *op = jstr(m, "op") ? jstr(m, "op") : "", *id = jstr(m, "id") ? jstr(m, "id") : "";
    if (!strcmp(op, "exec")) {
        const char *cmd = jstr(m, "cmd") ? jstr(m, "cmd") : "", *cwd = jstr(m, "cwd") ? jstr(m, "cwd") : workdir;
        const char *argv[3] = {shell, "-c", cmd};
        Buf spec = {0};
        spec_head(&spec, cwd, NULL, 3, argv);
        spec_env(&spec, jget(m, "env"), NULL);
        const char *stage = jstr(m, "stage");
        Proc *st = stage ? find(stage) : NULL, *p;
        if (st && st->exited) {  /* a staged child that died: forget it, start one */
            unlink_proc(st);
            if (st->out_fd >= 0) { unwatch(st->out_fd); close(st->out_fd); }
            if (st->err_fd >= 0) { unwatch(st->err_fd); close(st->err_fd); }
            if (st->gate_w >= 0) close(st->gate_w);
            free_proc(st);
            st = NULL;
        }
        if (st) {  /* already in this step's cgroup: run at once, no handshake */
            free(st->key); st->key = xstrdup(id);
            st->launch = spec; st->has_launch = 1;
            if (!jtrue(m, "stdin")) feed_stdin(st, "", 0, 1);
            launch(st);
            p = st;
        } else {
            p = spawn(id, &spec, jtrue(m, "stdin"), 0, 0, fd);
            buf_free(&spec);
            if (!p) { char e[200]; snprintf(e, sizeof e, "OSError: %s", strerror(errno)); send_error(id, e); return; }
        }
        p->limit = jnum(m, "max_output", p->limit);
    } else if (!strcmp(op, "stage")) {
        if (!fork_child(id, 0, fd)) { char e[200]; snprintf(e, sizeof e, "OSError: %s", strerror(errno)); send_error(id, e); }
    } else if (!strcmp(op, "go")) {
        Proc *p = find(id);
        if (p) launch(p);
    } else if (!strcmp(op, "kill") || !strcmp(op, "session_close")) {
        Proc *p = find(id);
        if (p) killpg(p->pid, !strcmp(op, "kill") ? (int)jnum(m, "sig", SIGKILL) : SIGKILL);
    } else if (!strcmp(op, "session_new")) {
        const char *sh = jstr(m, "shell") ? jstr(m, "shell") : "/bin/bash";
        const char *argv[7] = {sh, "--noprofile", "--norc", "--noediting", "+H", "-i", NULL};
        int interactive = jtrue(m, "interactive");
        Buf spec = {0};
        spec_head(&spec, jstr(m, "cwd") ? jstr(m, "cwd") : workdir, jstr(m, "user"), interactive ? 6 : 3, argv);
        /* interactive, as ROCK's sessions: job-control notices for background jobs; no prompt, no line
           editing, no history kept or expanded */
        const char *quiet[] = {"PS1=", "PS2=", "PS0=", "HISTFILE=", "PROMPT_COMMAND=", NULL};
        spec_env(&spec, jget(m, "env"), interactive ? quiet : NULL);
        if (!spawn(id, &spec, 0, 1, 1, fd)) { char e[200]; snprintf(e, sizeof e, "OSError: %s", strerror(errno)); send_error(id, e); }
        buf_free(&spec);
    } else if (!strcmp(op, "stdin")) {
        Proc *p = find(id);
        if (p) {
            Buf raw = {0};
            Json *d = jget(m, "data");
            if (d && d->t == J_STR && b64dec(&raw, d->s, d->slen) < 0) { send_error(id, "binascii.Error: the data is not base64"); return; }
            feed_stdin(p, raw.p ? raw.p : "", raw.n, jtrue(m, "eof"));
            buf_free(&raw);
        }
    } else if (!strcmp(op, "session_run")) {
        session_run(m, id);
    } else if (!strcmp(op, "put")) {
        do_put(m, id);
    } else if (!strcmp(op, "put_data")) {
        Json *d = jget(m, "data");
        put_data(id, d && d->t == J_STR ? d->s : "", d && d->t == J_STR ? d->slen : 0, jtrue(m, "eof"));
    } else {
        char e[300];
        snprintf(e, sizeof e, "KeyError: unknown op '%.200s'", op);
        send_error(*id ? id : NULL, e);
    }
}

/* ---- output -------------------------------------------------------------------------------- */
static void emit(Proc *p, const char *cmd_id, int stream, const char *d, size_t n) {
    if (stream == 2 && p->merged && p->session_cmd && !strcmp(p->session_cmd, cmd_id)) return;
    long long room = p->limit - p->sent[stream];
    if (room <= 0) { p->dropped[stream] += (long long)n; return; }
    if ((long long)n > room) { p->dropped[stream] += (long long)n - room; n = (size_t)room; }
    p->sent[stream] += (long long)n;
    if (!n) return;
    Buf b = {0};
    buf_s(&b, "{\"op\":\"out\",\"id\":"); jesc(&b, cmd_id, strlen(cmd_id));
    buf_f(&b, ",\"fd\":%d,\"data\":\"", stream);
    b64enc(&b, (const unsigned char *)d, n);
    buf_s(&b, "\"}");
    send_buf(&b);
}

static void dropped_json(Buf *b, Proc *p) { buf_f(b, ",\"dropped\":{\"1\":%lld,\"2\":%lld}", p->dropped[1], p->dropped[2]); }

static void flush_session(Proc *p, int stream, const char *d, size_t n, int eof) {
    Buf *pend = &p->pending[stream];
    buf_add(pend, d, n);
    char *buf = pend->p;
    size_t len = pend->n;
    char *hit = p->marker_len && len >= p->marker_len ? memmem(buf, len, p->marker, p->marker_len) : NULL;
    char *cmd = xstrdup(p->session_cmd);
    if (hit) {
        size_t idx = (size_t)(hit - buf), after = idx + p->marker_len;
        if (stream == 1 && !memchr(buf + after, '\n', len - after) && !eof) {
            emit(p, cmd, stream, buf, idx);  /* the exit status after the marker has not arrived yet */
            buf_drop(pend, idx);
            free(cmd);
            return;
        }
        emit(p, cmd, stream, buf, idx);
        p->done_streams |= 1 << stream;
        if (stream == 1) {
            char st[32] = {0};
            size_t k = 0;
            for (size_t i = after; i < len && buf[i] != '\n' && k < sizeof st - 1; i++) st[k++] = buf[i];
            char *e;
            long v = strtol(st, &e, 10);
            p->has_status = k > 0 && *e == 0;
            p->status = (int)v;
        }
        pend->n = 0;
    } else if (eof) {
        emit(p, cmd, stream, buf, len);
        pend->n = 0;
    } else {
        size_t keep = p->marker_len - 1;  /* a tail that could start a marker split across two reads */
        if (len > keep) { emit(p, cmd, stream, buf, len - keep); buf_drop(pend, len - keep); }
    }
    if ((p->done_streams & 6) == 6) {
        Buf b = {0};
        buf_s(&b, "{\"op\":\"exit\",\"id\":"); jesc(&b, cmd, strlen(cmd));
        if (p->has_status) buf_f(&b, ",\"code\":%d", p->status); else buf_s(&b, ",\"code\":null");
        dropped_json(&b, p);
        buf_s(&b, p->has_status ? ",\"error\":null}" : ",\"error\":\"session shell exited\"}");
        send_buf(&b);
        free(p->session_cmd); p->session_cmd = NULL;
        p->marker_len = 0; p->has_status = 0;
        for (int i = 0; i < 3; i++) p->pending[i].n = 0;
    }
    free(cmd);
}

static void read_pipe(int fd) {
    int stream;
    Proc *p = by_fd(fd, &stream);
    if (!p) return;
    char data[CHUNK];
    ssize_t n = read(fd, data, sizeof data);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        n = 0;
    }
    if (n == 0) {
        unwatch(fd); close(fd);
        if (stream == 1) p->out_fd = -1; else p->err_fd = -1;
        if (p->marker_len) { p->done_streams |= 1 << stream; flush_session(p, stream, "", 0, 1); }
        return;
    }
    if (p->marker_len) flush_session(p, stream, data, (size_t)n, 0);
    else if (!strncmp(p->key, "s:", 2)) {}  /* session output between commands (a background job's) */
    else emit(p, p->key, stream, data, (size_t)n);
}

/* ---- lifecycle ----------------------------------------------------------------------------- */
static void reap(Proc *p) {
    if (p->pidfd < 0 && p->exited) return;
    if (p->pidfd >= 0) { unwatch(p->pidfd); close(p->pidfd); p->pidfd = -1; }
    int status; struct rusage ru;
    if (wait4(p->pid, &status, 0, &ru) == p->pid) {
        p->exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? -WTERMSIG(status) : -1;
        /* the command and every descendant it waited for */
        p->cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
        p->maxrss = ru.ru_maxrss;
        p->has_rusage = 1;
    } else p->exit_code = -1;
    p->exited = 1;
    p->exited_at = now();
    if (p->stdin_w >= 0) { if (p->stdin_watch) unwatch(p->stdin_w); close(p->stdin_w); p->stdin_w = -1; p->stdin_watch = 0; }
}

static void reap_all(void) {
    /* our own commands through reap (status and rusage reported); orphans of the sandbox (we are its
       init) simply collected. WNOWAIT first, so a command's status is never taken by the sweep */
    for (;;) {
        siginfo_t info;
        memset(&info, 0, sizeof info);
        if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) < 0 || info.si_pid == 0) return;
        Proc *own_ = NULL;
        for (Proc *p = procs; p; p = p->next) if (p->pid == info.si_pid && !p->exited) { own_ = p; break; }
        if (own_) reap(own_);
        else waitpid(info.si_pid, NULL, 0);
    }
}

static void finish_drained(void) {
    double t = now();
    for (Proc *p = procs, *next; p; p = next) {
        next = p->next;
        if (!p->exited) continue;
        int open_ = p->out_fd >= 0 || p->err_fd >= 0;
        if (open_ && t - p->exited_at < DRAIN_GRACE) continue;
        /* background children may hold the pipes open: keep draining them, but report now */
        for (int i = 0; i < 2; i++) {
            int *fd = i ? &p->err_fd : &p->out_fd;
            if (*fd >= 0) { unwatch(*fd); watch(*fd, W_SINK, EPOLLIN); *fd = -1; }
        }
        Buf b = {0};
        if (!strncmp(p->key, "s:", 2)) {
            if (p->session_cmd) {
                char e[80];
                snprintf(e, sizeof e, "session shell exited with status %d", p->exit_code);
                buf_s(&b, "{\"op\":\"exit\",\"id\":"); jesc(&b, p->session_cmd, strlen(p->session_cmd));
                buf_s(&b, ",\"code\":null"); dropped_json(&b, p);
                buf_s(&b, ",\"error\":"); jesc(&b, e, strlen(e)); buf_s(&b, "}");
                send_buf(&b);
            }
            buf_s(&b, "{\"op\":\"session_exit\",\"id\":"); jesc(&b, p->key, strlen(p->key));
            buf_f(&b, ",\"code\":%d}", p->exit_code);
        } else {
            buf_s(&b, "{\"op\":\"exit\",\"id\":"); jesc(&b, p->key, strlen(p->key));
            buf_f(&b, ",\"code\":%d", p->exit_code); dropped_json(&b, p);
            if (p->has_rusage) buf_f(&b, ",\"rusage\":{\"cpu_seconds\":%.6f,\"maxrss_kb\":%ld}", p->cpu, p->maxrss);
            buf_s(&b, "}");
        }
        send_buf(&b);
        if (p->gate_w >= 0) close(p->gate_w);
        unlink_proc(p);
        free_proc(p);
    }
}

static int next_timeout(void) {
    double best = -1, t = now();
    for (Proc *p = procs; p; p = p->next)
        if (p->exited) { double w = p->exited_at + DRAIN_GRACE - t; if (best < 0 || w < best) best = w; }
    if (best < 0) return -1;
    return best <= 0 ? 0 : (int)(best * 1000) + 1;
}

static void __attribute__((noreturn)) shutdown_all(void) {
    for (Proc *p = procs; p; p = p->next) killpg(p->pid, SIGKILL);
    _exit(0);
}

/* ---- the exec filter ----------------------------------------------------------------------- */
/* The filter stops every sendmsg until corral answers, and corral can answer only once it holds the
   listener: so the listener is sent by a helper thread started before the filter exists (a filter
   without TSYNC binds only the thread that installs it, and what that thread forks later). */
static struct { pthread_mutex_t mu; pthread_cond_t cv; int installed, fd; const char *msg; } hand = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, -1, NULL};

static void *hand_over(void *arg) {
    (void)arg;
    pthread_mutex_lock(&hand.mu);
    while (!hand.installed) pthread_cond_wait(&hand.cv, &hand.mu);
    pthread_mutex_unlock(&hand.mu);
    struct iovec iov = {.iov_base = (void *)hand.msg, .iov_len = strlen(hand.msg)};
    if (hand.fd >= 0) {
        char ctl[CMSG_SPACE(sizeof(int))];
        memset(ctl, 0, sizeof ctl);
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &hand.fd, sizeof(int));
        while (sendmsg(sock_fd, &mh, 0) < 0 && errno == EINTR) {}
    } else while (send(sock_fd, hand.msg, iov.iov_len, 0) < 0 && errno == EINTR) {}
    return NULL;
}

static void send_ready(const char *bpf_b64) {
    char msg[64];
    snprintf(msg, sizeof msg, "{\"op\":\"ready\",\"pid\":%d}", (int)getpid());
    if (!bpf_b64 || !*bpf_b64) { while (send(sock_fd, msg, strlen(msg), 0) < 0 && errno == EINTR) {} return; }
    Buf bpf = {0};
    b64dec(&bpf, bpf_b64, strlen(bpf_b64));
    hand.msg = msg;
    pthread_t helper;
    if (pthread_create(&helper, NULL, hand_over, NULL)) {
        /* no helper, no listener: `ready` goes without one and the host refuses the sandbox */
        while (send(sock_fd, msg, strlen(msg), 0) < 0 && errno == EINTR) {}
        return;
    }
    int fd = -1;
#if defined(__x86_64__) || defined(__aarch64__)
    if (bpf.n >= sizeof(struct sock_filter)) {
        struct sock_fprog prog = {.len = (unsigned short)(bpf.n / sizeof(struct sock_filter)), .filter = (struct sock_filter *)bpf.p};
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);  /* bwrap set it already */
        fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    }
#endif
    pthread_mutex_lock(&hand.mu);
    hand.fd = fd < 0 ? -1 : fd;
    hand.installed = 1;
    pthread_cond_signal(&hand.cv);
    pthread_mutex_unlock(&hand.mu);
    pthread_join(helper, NULL);
    if (fd >= 0) close(fd);
    buf_free(&bpf);
}

/* ---- main ---------------------------------------------------------------------------------- */
static char *take_env(const char *name) {
    const char *v = getenv(name);
    char *copy = v ? xstrdup(v) : NULL;
    unsetenv(name);
    return copy;
}

/* Launcher mode (sandbox/deployment.py): on the host, as root, before bwrap. Joins the sandbox's cgroups
 * (so everything bwrap starts is accounted from its first instruction), the image's mount namespace and
 * the sandbox's network namespace, sets the process limits, drops to the sandbox's uid, then execs bwrap.
 * Arguments: [--cgroup JOIN_FILE]... --netns FD [--mntns FD] --nproc N --nofile N --uid U -- BWRAP ARGS...
 * Any failure exits 127 naming it, before bwrap runs: nothing starts half placed. */
static int launcher(int argc, char **argv) {
    int netns = -1, mntns = -1, i;
    long nproc = -1, nofile = -1;
    long uid = -1;
    char *cg[16];
    int ncg = 0;
    for (i = 2; i < argc && strcmp(argv[i], "--"); i += 2) {
        if (i + 1 >= argc) { fprintf(stderr, "corral launcher: %s needs a value\n", argv[i]); return 127; }
        char *k = argv[i], *val = argv[i + 1];
        if (!strcmp(k, "--cgroup") && ncg < 16) cg[ncg++] = val;
        else if (!strcmp(k, "--netns")) netns = atoi(val);
        else if (!strcmp(k, "--mntns")) mntns = atoi(val);
        else if (!strcmp(k, "--nproc")) nproc = atol(val);
        else if (!strcmp(k, "--nofile")) nofile = atol(val);
        else if (!strcmp(k, "--uid")) uid = atol(val);
        else { fprintf(stderr, "corral launcher: unknown option %s\n", k); return 127; }
    }
    if (i >= argc - 1 || netns < 0 || nproc < 0 || nofile < 0 || uid < 0) {
        fprintf(stderr, "corral launcher: usage: --netns FD --nproc N --nofile N --uid U -- BWRAP ARGS...\n");
        return 127;
    }
    /* "0": this process, single-threaded, moves itself (cgroups.py join_files: no global lock on v1) */
    for (int c = 0; c < ncg; c++) {
        int fd = open(cg[c], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) { fprintf(stderr, "corral launcher: joining %s: %s\n", cg[c], strerror(errno)); return 127; }
        close(fd);
    }
    if (mntns >= 0 && setns(mntns, CLONE_NEWNS)) { perror("corral launcher: setns(mount)"); return 127; }
    if (setns(netns, CLONE_NEWNET)) { perror("corral launcher: setns(net)"); return 127; }
    close(netns);
    if (mntns >= 0) close(mntns);
    struct rlimit rp = {(rlim_t)nproc, (rlim_t)nproc}, rf = {(rlim_t)nofile, (rlim_t)nofile}, rc = {0, 0};
    if (setrlimit(RLIMIT_NPROC, &rp) || setrlimit(RLIMIT_NOFILE, &rf) || setrlimit(RLIMIT_CORE, &rc)) {
        perror("corral launcher: setrlimit"); return 127;
    }
    if (setgroups(0, NULL) || setresgid((gid_t)uid, (gid_t)uid, (gid_t)uid) || setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid)) {
        perror("corral launcher: dropping to the sandbox's uid"); return 127;
    }
    execvp(argv[i + 1], &argv[i + 1]);
    fprintf(stderr, "corral launcher: exec %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--corral-launch")) return launcher(argc, argv);
    /* first: nothing of ours may be readable through /proc, not even for a moment */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) { perror("corral agent: prctl(PR_SET_DUMPABLE, 0)"); return 1; }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    char *v;
    if ((v = take_env("CORRAL_SOCK_FD"))) sock_fd = atoi(v);
    char *envjson = take_env("CORRAL_AGENT_ENV");
    if (envjson) {
        Parser ps = {envjson, envjson + strlen(envjson), 0};
        jparse(&ps, &base_env, 0);
        if (ps.err || base_env.t != J_OBJ) { fprintf(stderr, "corral agent: CORRAL_AGENT_ENV is not a JSON object\n"); return 1; }
    } else base_env.t = J_OBJ;
    if ((v = take_env("CORRAL_SHELL"))) shell = v;
    if ((v = take_env("CORRAL_WORKDIR"))) workdir = v;
    if ((v = take_env("CORRAL_RUN_AS")) && *v) {
        /* an image's User: commands and sessions run as uid:gid (the agent stays root in its namespace) */
        unsigned u, g;
        if (sscanf(v, "%u:%u", &u, &g) != 2) { fprintf(stderr, "corral agent: CORRAL_RUN_AS is not uid:gid\n"); return 1; }
        has_run_as = 1; run_uid = u; run_gid = g;
    }
    char *bpf = take_env("CORRAL_EXEC_FILTER");
    /* as init, every orphan of the sandbox is ours to reap: SIGCHLD through a signalfd */
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    ep = epoll_create1(EPOLL_CLOEXEC);
    sig_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (ep < 0 || sig_fd < 0) { perror("corral agent: epoll/signalfd"); return 1; }
    watch(sock_fd, W_SOCK, EPOLLIN);
    watch(sig_fd, W_SIG, EPOLLIN);
    send_ready(bpf);  /* every exec by anything we start is now held until corral says continue */
    char *msg = malloc(RECV_MAX + 1);
    if (!msg) die_oom();
    for (;;) {
        struct epoll_event evs[32];
        int n = epoll_wait(ep, evs, 32, next_timeout());
        for (int i = 0; i < n; i++) {
            int kind = (int)(evs[i].data.u64 >> 32), fd = (int)(uint32_t)evs[i].data.u64;
            if (kind == W_SOCK) {
                ssize_t got;
                int req_fd = -1;  /* a request may carry one descriptor (the cgroup a new child joins) */
                char cbuf[CMSG_SPACE(sizeof(int))];
                struct iovec iov = {msg, RECV_MAX};
                struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
                while ((got = recvmsg(sock_fd, &mh, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {}
                if (got <= 0) shutdown_all();
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
                    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int)))
                        memcpy(&req_fd, CMSG_DATA(c), sizeof req_fd);
                Json m = {0};
                Parser ps = {msg, msg + got, 0};
                jparse(&ps, &m, 0);
                if (ps.err || m.t != J_OBJ) send_error(NULL, "ValueError: the request is not a JSON object");
                else handle(&m, req_fd);  /* report, never die: the agent is the sandbox's lifeline */
                jfree(&m);
                if (req_fd >= 0) close(req_fd);  /* the child has its own copy; no other request keeps one */
            } else if (kind == W_PIDFD) {
                for (Proc *p = procs; p; p = p->next) if (p->pidfd == fd) { reap(p); break; }
            } else if (kind == W_PIPE) {
                read_pipe(fd);
            } else if (kind == W_STDIN) {
                for (Proc *p = procs; p; p = p->next) if (p->stdin_w == fd) { write_stdin(p); break; }
            } else if (kind == W_SINK) {
                char sink[CHUNK];
                ssize_t r = read(fd, sink, sizeof sink);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { unwatch(fd); close(fd); }
            } else if (kind == W_SIG) {
                struct signalfd_siginfo si;
                while (read(sig_fd, &si, sizeof si) > 0) {}
                reap_all();
            }
        }
        finish_drained();
    }
}
