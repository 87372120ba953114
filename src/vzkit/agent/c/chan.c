/* vzkit-agent: channels — exec'd processes, file reads, file writes. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define OUT_PIPE_SIZE (256 * 1024) /* a child's stdout pipe (see spawn) */

extern char **environ;

static const char DEFAULT_PATH[] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/* ---- payload parsing ------------------------------------------------------------------------ */

struct reader {
    const unsigned char *p;
    size_t n;
    bool bad;
};

static uint32_t rd_u32(struct reader *r)
{
    if (r->n < 4) {
        r->bad = true;
        return 0;
    }
    uint32_t v = get_u32(r->p);
    r->p += 4;
    r->n -= 4;
    return v;
}

/* A u32-length-prefixed string, copied and NUL-terminated; *nul is set if it contains NUL. */
static char *rd_str(struct reader *r, bool *nul)
{
    uint32_t len = rd_u32(r);
    if (r->bad || len > r->n) {
        r->bad = true;
        return NULL;
    }
    char *s = malloc((size_t)len + 1);
    if (!s) {
        r->bad = true;
        return NULL;
    }
    memcpy(s, r->p, len);
    s[len] = 0;
    if (memchr(r->p, 0, len))
        *nul = true;
    r->p += len;
    r->n -= len;
    return s;
}

static void free_strv(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

/* ---- channel bookkeeping -------------------------------------------------------------------- */

static struct chan *chan_new(struct session *s, uint32_t id, enum chan_kind kind)
{
    struct chan *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->sess = s;
    c->id = id;
    c->kind = kind;
    c->fd[0] = c->fd[1] = c->in_fd = c->wfd = -1;
    c->next = s->chans;
    s->chans = c;
    return c;
}

struct chan *chan_find(struct session *s, uint32_t id)
{
    for (struct chan *c = s->chans; c; c = c->next)
        if (c->id == id)
            return c;
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void drop_stdin(struct chan *c)
{
    while (c->in_head) {
        struct buf *b = c->in_head;
        c->in_head = b->next;
        c->in_ungranted += b->len - b->off;
        buf_free(b);
    }
    c->in_tail = NULL;
}

void chan_free(struct chan *c)
{
    if (c->dead)
        return;
    c->dead = true;
    close_fd(&c->fd[0]);
    close_fd(&c->fd[1]);
    close_fd(&c->in_fd);
    close_fd(&c->wfd);
    drop_stdin(c);
    free(c->tmp_path);
    free(c->path);
    for (struct chan **pp = &c->sess->chans; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    chan_bury(c);
}

/* Host -> agent credit: give consumed bytes back when a quarter window is due or on `force`. */
static void maybe_grant(struct chan *c, bool force)
{
    if (c->in_ungranted == 0 || (!force && c->in_ungranted < IN_WINDOW / 4))
        return;
    send_window(c->sess, c->id, (uint32_t)c->in_ungranted, STREAM_OUT);
    c->in_outstanding -= c->in_ungranted;
    c->in_ungranted = 0;
}

/* ---- exec -------------------------------------------------------------------------------------- */

static int exit_code_for(int err) { return err == ENOENT || err == ENOTDIR ? 127 : 126; }

static const char *env_path(char **envp)
{
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            return *e + 5;
    return DEFAULT_PATH;
}

/* In the child: execve argv[0], searching PATH (of the new environment) when it has no '/'. */
static void child_exec(char **argv, char **envp)
{
    const char *file = argv[0];
    int err = ENOENT;
    if (!*file) {
        err = ENOENT;
    } else if (strchr(file, '/')) {
        execve(file, argv, envp);
        err = errno;
    } else {
        bool eacces = false;
        const char *p = env_path(envp);
        char buf[PATH_MAX];
        for (;;) {
            const char *end = strchrnul(p, ':');
            size_t dl = (size_t)(end - p);
            if (dl + 1 + strlen(file) < sizeof buf) {
                if (dl) {
                    memcpy(buf, p, dl);
                    buf[dl] = '/';
                    strcpy(buf + dl + 1, file);
                } else {
                    strcpy(buf, file); /* an empty PATH entry is the current directory */
                }
                execve(buf, argv, envp);
                if (errno == EACCES)
                    eacces = true;
                else if (errno != ENOENT && errno != ENOTDIR) {
                    err = errno;
                    break;
                }
            }
            if (!*end)
                break;
            p = end + 1;
        }
        if (eacces && err == ENOENT)
            err = EACCES;
    }
    dprintf(2, "vzkit-agent: exec %s: %s\n", file, strerror(err));
    _exit(exit_code_for(err));
}

/* environ plus `add` ("K=V", later entries win), as a new NULL-terminated array. */
static char **merge_env(char **add, size_t nadd)
{
    size_t nenv = 0;
    while (environ[nenv])
        nenv++;
    char **out = calloc(nenv + nadd + 1, sizeof *out);
    if (!out)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < nenv; i++) {
        const char *eq = strchr(environ[i], '=');
        size_t kl = eq ? (size_t)(eq - environ[i]) : strlen(environ[i]);
        bool overridden = false;
        for (size_t j = 0; j < nadd && !overridden; j++)
            overridden = !strncmp(add[j], environ[i], kl) && add[j][kl] == '=';
        if (!overridden)
            out[n++] = environ[i];
    }
    for (size_t j = 0; j < nadd; j++)
        out[n++] = add[j];
    out[n] = NULL;
    return out;
}

static void spawn(struct session *s, struct chan *c, uint32_t flags, char **argv, char **envp,
                  const char *cwd)
{
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    bool merge = flags & EXEC_MERGE_STDERR;
    if (((flags & EXEC_STDIN) && pipe2(in, O_CLOEXEC) < 0) || pipe2(out, O_CLOEXEC) < 0 ||
        (!merge && pipe2(err, O_CLOEXEC) < 0)) {
        send_error(s, c->id, errno, "exec %s: pipe: %s", argv[0], strerror(errno));
        goto fail;
    }
    /* A stdin pipe that holds the whole window: stdin then goes straight from the session
     * into it (splice, see serve.c) unless the child stops reading. Best effort: an
     * unprivileged agent may be held to a smaller pipe. */
    if (in[1] >= 0)
        (void)fcntl(in[1], F_SETPIPE_SZ, (int)IN_WINDOW);
    /* ...and a stdout pipe the child can fill ahead while the agent sends: it is read several
     * frames at a time (chan_on_readable) */
    (void)fcntl(out[0], F_SETPIPE_SZ, (int)OUT_PIPE_SIZE);
    pid_t pid = fork();
    if (pid < 0) {
        send_error(s, c->id, errno, "exec %s: fork: %s", argv[0], strerror(errno));
        goto fail;
    }
    if (pid == 0) {
        setsid();
        reset_child_signals();
        if (in[0] >= 0) {
            dup2(in[0], 0);
        } else {
            int null = open("/dev/null", O_RDONLY);
            if (null >= 0 && null != 0) {
                dup2(null, 0);
                close(null);
            }
        }
        dup2(out[1], 1);
        dup2(merge ? out[1] : err[1], 2);
        if (*cwd && chdir(cwd) < 0) {
            dprintf(2, "vzkit-agent: chdir %s: %s\n", cwd, strerror(errno));
            _exit(126);
        }
        child_exec(argv, envp);
    }
    close(out[1]);
    if (!merge)
        close(err[1]);
    if (in[0] >= 0)
        close(in[0]);
    c->pid = pid;
    c->fd[STREAM_OUT] = out[0];
    c->fd[STREAM_ERR] = merge ? -1 : err[0];
    c->in_fd = in[1];
    set_nonblock(out[0]);
    if (!merge)
        set_nonblock(err[0]);
    if (in[1] >= 0)
        set_nonblock(in[1]);
    debugmsg("channel %u: exec %s (pid %d)", c->id, argv[0], (int)pid);
    return;
fail:
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0)
            close(in[i]);
        if (out[i] >= 0)
            close(out[i]);
        if (err[i] >= 0)
            close(err[i]);
    }
    chan_free(c);
}

int chan_exec(struct session *s, uint32_t id, const unsigned char *p, size_t n)
{
    struct reader r = {p, n, false};
    uint32_t flags = rd_u32(&r), timeout_ms = rd_u32(&r), window = rd_u32(&r);
    uint32_t argc = rd_u32(&r), envc = rd_u32(&r);
    /* every string needs at least its 4-byte length: bounds the allocations below */
    if (r.bad || (uint64_t)argc + envc + 1 > r.n / 4)
        return -1;
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    char **env = calloc((size_t)envc + 1, sizeof *env);
    char *cwd = NULL;
    char **envp = NULL;
    bool nul = false;
    int rc = 0;
    if (!argv || !env) {
        send_error(s, id, ENOMEM, "exec: out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < argc && !r.bad; i++)
        argv[i] = rd_str(&r, &nul);
    for (uint32_t i = 0; i < envc && !r.bad; i++)
        env[i] = rd_str(&r, &nul);
    cwd = rd_str(&r, &nul);
    if (r.bad || r.n != 0) {
        rc = -1;
        goto out;
    }
    if (flags & ~(uint32_t)(EXEC_STDIN | EXEC_ENV_REPLACE | EXEC_MERGE_STDERR)) {
        send_error(s, id, EINVAL, "exec: unknown flags 0x%x", flags);
        goto out;
    }
    if (argc == 0 || nul) {
        send_error(s, id, EINVAL, "exec: %s", argc ? "NUL byte in an argument" : "empty argv");
        goto out;
    }
    for (uint32_t i = 0; i < envc; i++) {
        if (!strchr(env[i], '=')) {
            send_error(s, id, EINVAL, "exec: environment entry without '=': %s", env[i]);
            goto out;
        }
    }
    envp = (flags & EXEC_ENV_REPLACE) ? env : merge_env(env, envc);
    struct chan *c = envp ? chan_new(s, id, CH_EXEC) : NULL;
    if (!c) {
        send_error(s, id, ENOMEM, "exec: out of memory");
        goto out;
    }
    c->window[0] = c->window[1] = window;
    if (timeout_ms)
        c->deadline_ms = now_ms() + timeout_ms;
    spawn(s, c, flags, argv, envp, cwd);
out:
    if (envp != env)
        free(envp); /* the array only: its strings belong to environ and env */
    free_strv(argv);
    free_strv(env);
    free(cwd);
    return rc;
}

void chan_kill(struct chan *c, int sig, bool group)
{
    if (c->kind != CH_EXEC || sig < 0 || sig >= 65)
        return;
    pid_t pgid = c->pid ? c->pid : c->exit_pgid;
    if (group && pgid > 0 && kill(-pgid, sig) == 0)
        return;
    if (c->pid > 0)
        kill(c->pid, sig);
}

void chan_cancel(struct chan *c)
{
    pid_t pgid = c->pid ? c->pid : c->exit_pgid;
    if (c->kind == CH_EXEC && pgid > 0)
        kill(-pgid, SIGKILL);
    if (c->kind == CH_EXEC && c->pid > 0)
        kill(c->pid, SIGKILL);
    if (c->kind == CH_WRITE && c->tmp_path) {
        close_fd(&c->wfd);
        unlink(c->tmp_path);
    }
    chan_free(c);
}

void chan_on_reaped(struct chan *c, int status)
{
    pid_t pgid = c->pid;
    c->pid = 0;
    c->status = status;
    /* the group lives on while a member holds the pipes; remember it for timeouts */
    c->exit_pgid = pgid;
    chan_check_done(c);
}

void chan_check_done(struct chan *c)
{
    if (c->kind != CH_EXEC || c->pid || c->fd[0] >= 0 || c->fd[1] >= 0)
        return;
    unsigned char p[12];
    int st = c->status;
    int32_t code = -1;
    uint32_t sig = 0, flags = c->timed_out ? EXIT_TIMED_OUT : 0;
    if (WIFEXITED(st)) {
        code = WEXITSTATUS(st);
    } else if (WIFSIGNALED(st)) {
        sig = (uint32_t)WTERMSIG(st);
        if (WCOREDUMP(st))
            flags |= EXIT_CORE_DUMPED;
    }
    put_u32(p, (uint32_t)code);
    put_u32(p + 4, sig);
    put_u32(p + 8, flags);
    debugmsg("channel %u: exit code %d signal %u flags %u", c->id, code, sig, flags);
    send_frame(c->sess, T_EXIT, c->id, p, sizeof p);
    chan_free(c);
}

void chan_on_deadline(struct chan *c, int64_t now)
{
    (void)now;
    c->deadline_ms = 0;
    if (c->kind != CH_EXEC)
        return;
    c->timed_out = true;
    pid_t pgid = c->pid ? c->pid : c->exit_pgid;
    debugmsg("channel %u: timeout, killing process group %d", c->id, (int)pgid);
    if (pgid > 0)
        kill(-pgid, SIGKILL);
    if (c->pid > 0)
        kill(c->pid, SIGKILL);
}

/* ---- data in both directions ------------------------------------------------------------------ */

/* Frames read from a child's pipe (or a file) per wake-up while it has more: they go out in
 * one write (serve.c, flush_output). */
#define READ_BATCH 4

void chan_on_readable(struct chan *c, int stream)
{
    struct session *s = c->sess;
    uint8_t type = c->kind == CH_READ ? T_FILE_DATA : stream == STREAM_OUT ? T_STDOUT : T_STDERR;
    ssize_t n = 0;
    for (int i = 0; i < READ_BATCH; i++) {
        uint64_t want = c->window[stream];
        if (want > DATA_FRAME_PAYLOAD)
            want = DATA_FRAME_PAYLOAD;
        if (i > 0 && (want < DATA_FRAME_PAYLOAD || s->out_bytes >= session_out_limit()))
            return;
        n = send_from_fd(s, type, c->id, c->fd[stream], (size_t)want);
        if (n <= 0)
            break;
        c->window[stream] -= (uint64_t)n;
        c->total += (uint64_t)n;
        if ((uint64_t)n < want)
            return; /* drained for now */
    }
    if (n > 0)
        return;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (c->kind == CH_READ) {
        if (n < 0) {
            send_error(s, c->id, errno, "read_file %s: %s", c->path, strerror(errno));
        } else {
            unsigned char p[8];
            put_u64(p, c->total);
            send_frame(s, T_FILE_END, c->id, p, sizeof p);
        }
        chan_free(c);
        return;
    }
    if (n < 0)
        logmsg("channel %u: reading output: %s", c->id, strerror(errno));
    close_fd(&c->fd[stream]);
    chan_check_done(c);
}

/* Write stdin bytes to the child: how many it took (0: its pipe is full), or -1 when it closed
 * its stdin (EPIPE), after which everything queued is discarded. */
static ssize_t stdin_write(struct chan *c, const void *p, size_t n)
{
    ssize_t w;
    do
        w = write(c->in_fd, p, n);
    while (w < 0 && errno == EINTR);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;
    if (w < 0) {
        drop_stdin(c);
        close_fd(&c->in_fd);
        return -1;
    }
    c->in_ungranted += (uint64_t)w;
    return w;
}

void chan_on_stdin_writable(struct chan *c)
{
    while (c->in_head) {
        struct buf *b = c->in_head;
        ssize_t n = stdin_write(c, b->data + b->off, b->len - b->off);
        if (n <= 0)
            break;
        b->off += (size_t)n;
        if (b->off == b->len) {
            c->in_head = b->next;
            if (!c->in_head)
                c->in_tail = NULL;
            buf_free(b);
        }
    }
    if (!c->in_head && c->in_eof)
        close_fd(&c->in_fd);
    maybe_grant(c, false);
}

/* Whether `n` bytes of stdin may go straight into the child's pipe (splice, see serve.c): an
 * exec channel with an open stdin, nothing queued before them, within the window, and a pipe
 * that holds less than a window (one fed from a socket can take more than its size). */
bool chan_stdin_direct(const struct chan *c, size_t n)
{
    int piped = 0;
    return c->kind == CH_EXEC && c->in_fd >= 0 && !c->in_eof && !c->in_head &&
           c->in_outstanding + n <= IN_WINDOW && ioctl(c->in_fd, FIONREAD, &piped) == 0 &&
           (size_t)piped + n <= IN_WINDOW;
}

/* `n` bytes of stdin went straight into the child's pipe. */
void chan_stdin_spliced(struct chan *c, size_t n)
{
    c->in_outstanding += n;
    c->in_ungranted += n;
    maybe_grant(c, false);
}

static void write_failed(struct chan *c, int err)
{
    send_error(c->sess, c->id, err, "write_file %s: %s", c->path, strerror(err));
    close_fd(&c->wfd);
    unlink(c->tmp_path);
    chan_free(c);
}

int chan_data(struct session *s, struct chan *c, uint8_t type, const unsigned char *p, size_t n)
{
    (void)s;
    if (type == T_FILE_END) {
        if (c->kind != CH_WRITE || n != 0)
            return -1;
        int fd = c->wfd;
        c->wfd = -1;
        if (close(fd) < 0) {
            write_failed(c, errno);
            return 0;
        }
        if (rename(c->tmp_path, c->path) < 0) {
            write_failed(c, errno);
            return 0;
        }
        free(c->tmp_path);
        c->tmp_path = NULL;
        send_frame(s, T_OK, c->id, NULL, 0);
        chan_free(c);
        return 0;
    }
    bool ok_type = (type == T_STDIN && c->kind == CH_EXEC) ||
                   (type == T_FILE_DATA && c->kind == CH_WRITE);
    if (!ok_type)
        return -1;
    if (c->in_outstanding + n > IN_WINDOW)
        return -2; /* the host ignored the window */
    c->in_outstanding += n;
    if (c->kind == CH_WRITE) {
        if (write_all(c->wfd, p, n) < 0) {
            write_failed(c, errno);
            return 0;
        }
        c->in_ungranted += n;
        maybe_grant(c, false);
        return 0;
    }
    if (c->in_fd < 0 || c->in_eof) { /* no stdin pipe (any more): discard */
        c->in_ungranted += n;
        maybe_grant(c, true);
        return 0;
    }
    size_t done = 0;
    if (!c->in_head) { /* nothing queued: straight into the pipe, queue what it does not take */
        ssize_t w = stdin_write(c, p, n);
        if (w < 0) { /* the child closed its stdin: discard */
            c->in_ungranted += n;
            maybe_grant(c, true);
            return 0;
        }
        done = (size_t)w;
        if (done == n) {
            maybe_grant(c, false);
            return 0;
        }
    }
    struct buf *b = buf_new(n - done);
    if (!b) {
        c->in_ungranted += n - done;
        maybe_grant(c, true);
        return 0;
    }
    memcpy(b->data, p + done, n - done);
    if (c->in_tail)
        c->in_tail->next = b;
    else
        c->in_head = b;
    c->in_tail = b;
    chan_on_stdin_writable(c);
    return 0;
}

int chan_stdin_eof(struct session *s, struct chan *c)
{
    (void)s;
    if (c->kind != CH_EXEC)
        return -1;
    c->in_eof = true;
    if (!c->in_head)
        close_fd(&c->in_fd);
    return 0;
}

/* ---- files ------------------------------------------------------------------------------------- */

static char *rd_path(struct reader *r)
{
    if (r->n == 0 || memchr(r->p, 0, r->n))
        return NULL;
    char *path = malloc(r->n + 1);
    if (path) {
        memcpy(path, r->p, r->n);
        path[r->n] = 0;
    }
    return path;
}

int chan_read_file(struct session *s, uint32_t id, const unsigned char *p, size_t n)
{
    struct reader r = {p, n, false};
    uint32_t window = rd_u32(&r);
    if (r.bad)
        return -1;
    char *path = rd_path(&r);
    if (!path) {
        send_error(s, id, EINVAL, "read_file: empty path or NUL byte in path");
        return 0;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    struct stat st;
    int err = fd < 0 ? errno : fstat(fd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    struct chan *c = err ? NULL : chan_new(s, id, CH_READ);
    if (!err && !c)
        err = ENOMEM;
    if (err) {
        send_error(s, id, err, "read_file %s: %s", path, strerror(err));
        if (fd >= 0)
            close(fd);
        free(path);
        return 0;
    }
    c->fd[STREAM_OUT] = fd;
    c->window[STREAM_OUT] = window;
    c->path = path;
    return 0;
}

int chan_write_file(struct session *s, uint32_t id, const unsigned char *p, size_t n)
{
    struct reader r = {p, n, false};
    uint32_t mode = rd_u32(&r), flags = rd_u32(&r);
    if (r.bad)
        return -1;
    char *path = rd_path(&r);
    if (!path || flags) {
        send_error(s, id, EINVAL, "write_file: %s",
                   flags ? "unknown flags" : "empty path or NUL byte in path");
        free(path);
        return 0;
    }
    size_t len = strlen(path);
    const char *slash = strrchr(path, '/');
    size_t dirlen = slash ? (size_t)(slash - path) + 1 : 0;
    char *tmp = malloc(len + 32);
    struct chan *c = NULL;
    int err = 0;
    if (path[len - 1] == '/') {
        err = EISDIR;
    } else if (!tmp) {
        err = ENOMEM;
    } else {
        snprintf(tmp, len + 32, "%.*s.%s.vzkit-XXXXXX", (int)dirlen, path, path + dirlen);
        int fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0) {
            err = errno;
        } else {
            err = fchmod(fd, mode & 07777) < 0 ? errno : 0;
            if (!err && !(c = chan_new(s, id, CH_WRITE)))
                err = ENOMEM;
            if (err) {
                close(fd);
                unlink(tmp);
            } else {
                c->wfd = fd;
            }
        }
    }
    if (err || !c) {
        err = err ? err : EIO;
        send_error(s, id, err, "write_file %s: %s", path, strerror(err));
        free(tmp);
        free(path);
        return 0;
    }
    c->tmp_path = tmp;
    c->path = path;
    return 0;
}
