/* vzkit-agent: exec channels — a process spawned in its own session (as the request's user,
 * user.c) on pipes or on a pseudo-terminal, its exit reported, killed on CANCEL, KILL or its
 * timeout. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define OUT_PIPE_SIZE (256 * 1024) /* a child's stdout pipe (see spawn) */

extern char **environ;

static const char DEFAULT_PATH[] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static void free_strv(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
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

/* The request's env with the user's HOME, USER and LOGNAME before it where it has none: a new
 * array of borrowed strings (*n updated), or NULL when out of memory. */
static char **with_user_env(char **env, size_t *n, const struct exec_user *u)
{
    char **out = calloc(*n + USER_ENV_N + 1, sizeof *out);
    if (!out)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < USER_ENV_N; i++) {
        size_t kl = (size_t)(strchr(u->env[i], '=') - u->env[i]) + 1; /* "KEY=" */
        bool given = false;
        for (size_t j = 0; j < *n && !given; j++)
            given = !strncmp(env[j], u->env[i], kl);
        if (!given)
            out[k++] = u->env[i];
    }
    for (size_t j = 0; j < *n; j++)
        out[k++] = env[j];
    *n = k;
    return out;
}

/* In the child: become the session leader, the pty slave its controlling terminal and its
 * stdin, stdout and stderr. */
static void child_tty(int slave)
{
    setsid();
    if (ioctl(slave, TIOCSCTTY, 0) < 0) {
        dprintf(slave, "vzkit-agent: TIOCSCTTY: %s\n", strerror(errno));
        _exit(126);
    }
    for (int fd = 0; fd < 3; fd++)
        dup2(slave, fd);
    if (slave > 2)
        close(slave);
}

/* A tty channel: the child on a new pty of size `ws` (its merged output and its input are the
 * master's; the agent keeps one descriptor of it for RESIZE). */
static void spawn_tty(struct session *s, struct chan *c, uint32_t flags, char **argv,
                      char **envp, const char *cwd, const struct exec_user *user,
                      const struct winsize *ws)
{
    int master = -1, slave = -1, out = -1, in = -1;
    if (openpty(&master, &slave, NULL, NULL, ws) < 0) {
        send_error(s, c->id, errno, "exec %s: openpty: %s", argv[0], strerror(errno));
        goto fail;
    }
    /* the agent is single-threaded: no fork can come between openpty and these */
    if (fcntl(master, F_SETFD, FD_CLOEXEC) < 0 || fcntl(slave, F_SETFD, FD_CLOEXEC) < 0 ||
        (out = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0 ||
        ((flags & EXEC_STDIN) && (in = fcntl(master, F_DUPFD_CLOEXEC, 3)) < 0)) {
        send_error(s, c->id, errno, "exec %s: pty: %s", argv[0], strerror(errno));
        goto fail;
    }
    /* the terminal is the user's, as login and sshd leave it (best effort: root's still works
     * through the descriptors the child holds) */
    if (user->set)
        (void)fchown(slave, user->uid, (gid_t)-1);
    pid_t pid = fork();
    if (pid < 0) {
        send_error(s, c->id, errno, "exec %s: fork: %s", argv[0], strerror(errno));
        goto fail;
    }
    if (pid == 0) {
        child_tty(slave);
        reset_child_signals();
        if (user_apply(user) < 0)
            _exit(126);
        if (*cwd && chdir(cwd) < 0) {
            dprintf(2, "vzkit-agent: chdir %s: %s\n", cwd, strerror(errno)); /* ONLCR adds the CR */
            _exit(126);
        }
        child_exec(argv, envp);
    }
    close(slave);
    set_nonblock(master); /* one open file: its dups are non-blocking too */
    c->pid = pid;
    c->pty_fd = master;
    c->fd[STREAM_OUT] = out;
    c->fd[STREAM_ERR] = -1;
    c->in_fd = in;
    debugmsg("channel %u: exec %s on a pty (pid %d)", c->id, argv[0], (int)pid);
    return;
fail:
    for (int *fd = (int[]){master, slave, out, in}, i = 0; i < 4; i++)
        if (fd[i] >= 0)
            close(fd[i]);
    chan_free(c);
}

static void spawn(struct session *s, struct chan *c, uint32_t flags, char **argv, char **envp,
                  const char *cwd, const struct exec_user *user)
{
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    bool merge = flags & EXEC_MERGE_STDERR;
    if (((flags & EXEC_STDIN) && pipe2(in, O_CLOEXEC) < 0) || pipe2(out, O_CLOEXEC) < 0 ||
        (!merge && pipe2(err, O_CLOEXEC) < 0)) {
        send_error(s, c->id, errno, "exec %s: pipe: %s", argv[0], strerror(errno));
        goto fail;
    }
    /* A stdin pipe that holds the whole window: stdin then goes straight from the session
     * into it (splice, see session.c) unless the child stops reading. Best effort: an
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
        if (user_apply(user) < 0) /* before chdir: the directory is entered as the user */
            _exit(126);
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
    char *cwd = NULL, *spec = NULL;
    char **req = env, **envp = NULL;
    size_t reqc = envc;
    struct exec_user user = {0};
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
    if (!r.bad && r.n > 0) /* 2.1: the user to run as (absent or empty: the agent's) */
        spec = rd_str(&r, &nul);
    struct winsize ws = {0};
    if (flags & EXEC_TTY) { /* 2.2: the pty's size follows the user (then always there) */
        uint32_t rows = rd_u32(&r), cols = rd_u32(&r);
        if (rows > TTY_SIZE_MAX || cols > TTY_SIZE_MAX) {
            rc = -1;
            goto out;
        }
        ws.ws_row = (unsigned short)rows;
        ws.ws_col = (unsigned short)cols;
    }
    if (r.bad || r.n != 0) {
        rc = -1;
        goto out;
    }
    if (flags & ~(uint32_t)(EXEC_STDIN | EXEC_ENV_REPLACE | EXEC_MERGE_STDERR | EXEC_TTY)) {
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
    if (spec && *spec) {
        char msg[400];
        int err = 0;
        if (user_resolve(spec, &user, &err, msg, sizeof msg) < 0) {
            send_error(s, id, err, "exec %s: %s", argv[0], msg);
            goto out;
        }
        if (!(req = with_user_env(env, &reqc, &user))) {
            send_error(s, id, ENOMEM, "exec: out of memory");
            goto out;
        }
    }
    envp = (flags & EXEC_ENV_REPLACE) ? req : merge_env(req, reqc);
    struct chan *c = envp ? chan_new(s, id, CH_EXEC) : NULL;
    if (!c) {
        send_error(s, id, ENOMEM, "exec: out of memory");
        goto out;
    }
    c->window[0] = c->window[1] = window;
    if (timeout_ms)
        c->deadline_ms = now_ms() + timeout_ms;
    if (flags & EXEC_TTY)
        spawn_tty(s, c, flags, argv, envp, cwd, &user, &ws);
    else
        spawn(s, c, flags, argv, envp, cwd, &user);
out:
    /* the arrays only: their strings belong to environ, env and user */
    if (envp != req)
        free(envp);
    if (req != env)
        free(req);
    user_free(&user);
    free_strv(argv);
    free_strv(env);
    free(cwd);
    free(spec);
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

void chan_resize(struct chan *c, uint32_t rows, uint32_t cols)
{
    if (c->kind != CH_EXEC || c->pty_fd < 0)
        return;
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    /* the kernel sends SIGWINCH to the terminal's foreground process group */
    if (ioctl(c->pty_fd, TIOCSWINSZ, &ws) < 0)
        logmsg("channel %u: TIOCSWINSZ: %s", c->id, strerror(errno));
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
