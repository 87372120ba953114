/* vzkit-agent serve: one process, one poll() loop, non-blocking file descriptors.
 *
 * Transports (each connection is a session, transport.c): AF_VSOCK listener, the virtio console
 * port (one session at a time, re-opened/re-armed when the host side goes away), a unix listener
 * or stdin/stdout for tests. Sessions and channels are unlinked when they end and freed at the
 * end of the loop iteration, so poll entries never point at freed memory. This file holds the
 * state (serve.h), signals and children, and the loop.
 */
#include "serve.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

struct serve_state g_serve = {.unix_fd = -1, .vsock_fd = -1, .con_fd = -1};

/* ---- signals and children -------------------------------------------------------------------- */

static void on_signal(int sig)
{
    int saved = errno;
    unsigned char c = (unsigned char)sig;
    (void)!write(g_serve.sigpipe[1], &c, 1);
    errno = saved;
}

static void reap_children(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (struct session *s = g_serve.sessions; s; s = s->next) {
            for (struct chan *c = s->chans; c; c = c->next) {
                if (c->kind == CH_EXEC && c->pid == pid) {
                    chan_on_reaped(c, status);
                    goto next;
                }
            }
        }
    next:;
    }
}

static void on_signal_pipe(void)
{
    unsigned char buf[64];
    ssize_t n;
    while ((n = read(g_serve.sigpipe[0], buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == SIGCHLD)
                reap_children();
            else if (buf[i] == SIGIO)
                console_check();
            else if (buf[i] == SIGTERM || buf[i] == SIGINT || buf[i] == SIGHUP)
                g_serve.quit = true;
        }
    }
}

static void kill_everything(void)
{
    while (g_serve.sessions)
        session_end(g_serve.sessions);
}

static void do_poweroff(struct session *s)
{
    s->poweroff = false;
    logmsg("powering off (requested by the host)");
    if (g_test_mode) {
        kill_everything();
        sync();
        g_serve.quit = true;
        return;
    }
    kill_everything();
    sync();
    reboot(RB_POWER_OFF);
    logmsg("poweroff failed: %s", strerror(errno));
}

/* ---- the loop ------------------------------------------------------------------------------ */

enum pref_kind { P_SIG, P_LISTEN, P_SESS_IN, P_SESS_OUT, P_CHAN_OUT, P_CHAN_IN };

struct pref {
    enum pref_kind kind;
    void *obj;
    int stream;
};

static struct pollfd *g_pfd;
static struct pref *g_ref;
static size_t g_npfd, g_cap;

static void add_pfd(int fd, short events, enum pref_kind kind, void *obj, int stream)
{
    if (g_npfd == g_cap) {
        size_t cap = g_cap ? g_cap * 2 : 64;
        struct pollfd *p = realloc(g_pfd, cap * sizeof *p);
        if (!p)
            return;
        g_pfd = p;
        struct pref *r = realloc(g_ref, cap * sizeof *r);
        if (!r)
            return;
        g_ref = r;
        g_cap = cap;
    }
    g_pfd[g_npfd] = (struct pollfd){.fd = fd, .events = events};
    g_ref[g_npfd] = (struct pref){.kind = kind, .obj = obj, .stream = stream};
    g_npfd++;
}

static int64_t min_deadline(int64_t a, int64_t b) { return !a ? b : !b ? a : a < b ? a : b; }

static int64_t build_pollset(void)
{
    int64_t deadline = 0;
    g_npfd = 0;
    add_pfd(g_serve.sigpipe[0], POLLIN, P_SIG, NULL, 0);
    if (g_serve.unix_fd >= 0)
        add_pfd(g_serve.unix_fd, POLLIN, P_LISTEN, NULL, 0);
    if (g_serve.vsock_fd >= 0)
        add_pfd(g_serve.vsock_fd, POLLIN, P_LISTEN, NULL, 1);
    else if (g_serve.opts->vsock)
        deadline = min_deadline(deadline, g_serve.vsock_retry_at);
    if (g_serve.opts->console && g_serve.con_state != CON_UP)
        deadline = min_deadline(deadline, g_serve.con_retry_at ? g_serve.con_retry_at : now_ms());
    for (struct session *s = g_serve.sessions; s; s = s->next) {
        bool room = s->out_bytes < OUT_LIMIT;
        bool up = s->kind != SESS_CONSOLE || g_serve.con_state == CON_UP;
        if ((up && !s->closing && !s->poweroff && room) || s->draining)
            add_pfd(s->rfd, POLLIN, P_SESS_IN, s, 0);
        if (up && s->out_head)
            add_pfd(s->wfd, POLLOUT, P_SESS_OUT, s, 0);
        if (s->closing || s->poweroff)
            deadline = min_deadline(deadline, s->close_by_ms);
        else if (s->need_auth && !s->authed)
            deadline = min_deadline(deadline, s->auth_by_ms);
        for (struct chan *c = s->chans; c; c = c->next) {
            bool sock = c->kind == CH_TCP || c->kind == CH_UDP;
            for (int k = 0; k < 2; k++)
                if (c->fd[k] >= 0 && room && (sock ? sock_wants_read(c) : c->window[k] > 0))
                    add_pfd(c->fd[k], POLLIN, P_CHAN_OUT, c, k);
            if (c->in_fd >= 0 && (c->in_head || c->connecting))
                add_pfd(c->in_fd, POLLOUT, P_CHAN_IN, c, 0);
            if (c->deadline_ms)
                deadline = min_deadline(deadline, c->deadline_ms);
        }
    }
    return deadline;
}

static void bury(void)
{
    while (g_serve.grave_chans) {
        struct chan *c = g_serve.grave_chans;
        g_serve.grave_chans = c->next;
        free(c);
    }
    while (g_serve.grave_sessions) {
        struct session *s = g_serve.grave_sessions;
        g_serve.grave_sessions = s->next;
        free(s->in);
        free(s);
    }
}

void chan_bury(struct chan *c)
{
    c->next = g_serve.grave_chans;
    g_serve.grave_chans = c;
}

static void dispatch(size_t i)
{
    short re = g_pfd[i].revents;
    struct pref *r = &g_ref[i];
    if (!re)
        return;
    switch (r->kind) {
    case P_SIG:
        on_signal_pipe();
        break;
    case P_LISTEN:
        on_accept(g_pfd[i].fd, r->stream == 1);
        break;
    case P_SESS_IN: {
        struct session *s = r->obj;
        if (!s->dead)
            on_session_readable(s);
        break;
    }
    case P_SESS_OUT: {
        struct session *s = r->obj;
        if (s->dead)
            break;
        if (s->kind == SESS_CONSOLE && (re & (POLLHUP | POLLERR))) {
            on_session_readable(s); /* tells a host hang-up (read 0) from pending input */
            break;
        }
        if (flush_output(s) < 0) {
            if (s->kind == SESS_CONSOLE)
                console_reopen();
            else
                session_end(s);
        }
        break;
    }
    case P_CHAN_OUT: {
        struct chan *c = r->obj;
        if (!c->dead && (c->kind == CH_TCP || c->kind == CH_UDP))
            sock_on_readable(c);
        else if (!c->dead)
            chan_on_readable(c, r->stream);
        break;
    }
    case P_CHAN_IN: {
        struct chan *c = r->obj;
        if (!c->dead && (c->kind == CH_TCP || c->kind == CH_UDP))
            sock_on_writable(c);
        else if (!c->dead)
            chan_on_stdin_writable(c);
        break;
    }
    }
}

static void after_events(void)
{
    int64_t now = now_ms();
    struct session *next;
    for (struct session *s = g_serve.sessions; s; s = next) {
        next = s->next;
        struct chan *cn;
        for (struct chan *c = s->chans; c; c = cn) {
            cn = c->next;
            if (c->deadline_ms && now >= c->deadline_ms && c->kind == CH_TCP)
                sock_on_deadline(c);
            else if (c->deadline_ms && now >= c->deadline_ms)
                chan_on_deadline(c, now);
        }
        bool up = s->kind != SESS_CONSOLE || g_serve.con_state == CON_UP;
        if (up && s->out_head && flush_output(s) < 0) {
            if (s->kind == SESS_CONSOLE)
                console_reopen();
            else
                session_end(s);
            continue;
        }
        if (s->poweroff && (!s->out_head || now >= s->close_by_ms)) {
            do_poweroff(s);
            return;
        }
        if (s->closing && s->kind == SESS_SOCKET && !s->draining && !s->out_head &&
            now < s->close_by_ms) {
            shutdown(s->wfd, SHUT_WR); /* the peer reads all we sent, then EOF; we drain */
            s->draining = true;
        } else if (s->closing && (now >= s->close_by_ms || (!s->out_head && !s->draining))) {
            session_end(s);
        } else if (!s->closing && s->need_auth && !s->authed && now >= s->auth_by_ms) {
            logmsg("closing a connection that sent no AUTH within %d s", AUTH_TIMEOUT_MS / 1000);
            session_end(s);
        }
    }
    if (g_serve.vsock_fd < 0)
        vsock_check();
    if (g_serve.con_state != CON_UP && now >= g_serve.con_retry_at)
        console_check();
}

int serve_main(const struct serve_opts *opts)
{
    g_serve.opts = opts;
    if (pipe2(g_serve.sigpipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        logmsg("pipe: %s", strerror(errno));
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_NOCLDSTOP;
    int sigs[] = {SIGCHLD, SIGIO, SIGTERM, SIGINT, SIGHUP};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
        sigaction(sigs[i], &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (opts->unix_path) {
        g_serve.unix_fd = unix_listen(opts->unix_path);
        if (g_serve.unix_fd < 0)
            return 1;
    }
    if (opts->stdio) {
        /* move the session off fds 0/1 so children never inherit it */
        int rfd = fcntl(0, F_DUPFD_CLOEXEC, 3), wfd = fcntl(1, F_DUPFD_CLOEXEC, 3);
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (rfd < 0 || wfd < 0 || null < 0) {
            logmsg("stdio: %s", strerror(errno));
            return 1;
        }
        dup2(null, 0);
        dup2(null, 1);
        close(null);
        set_nonblock(rfd);
        set_nonblock(wfd);
        if (!session_new(SESS_STDIO, rfd, wfd))
            return 1;
    }
    vsock_check();
    console_check();
    debugmsg("serving (agent %s, protocol %d.%d)", AGENT_VERSION, PROTO_MAJOR, PROTO_MINOR);

    while (!g_serve.quit) {
        int64_t deadline = build_pollset();
        int timeout = -1;
        if (deadline) {
            int64_t left = deadline - now_ms();
            timeout = left < 0 ? 0 : left > 60000 ? 60000 : (int)left;
        }
        int n = poll(g_pfd, (nfds_t)g_npfd, timeout);
        if (n < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            sleep(1);
        }
        for (size_t i = 0; n > 0 && i < g_npfd; i++)
            dispatch(i);
        after_events();
        bury();
    }
    kill_everything();
    bury();
    if (opts->unix_path)
        unlink(opts->unix_path);
    return 0;
}
