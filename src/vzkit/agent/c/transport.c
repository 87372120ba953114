/* vzkit-agent serve: where sessions come from. The AF_VSOCK listener (host peers only), a unix
 * listener for tests, and the virtio console port (one session at a time, re-opened/re-armed
 * when the host side goes away). */
#include "serve.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#define CONSOLE_RECHECK_MS 250
#define CONSOLE_REOPEN_MS 1000
#define VSOCK_RETRY_MS 2000

/* ---- the virtio console port -------------------------------------------------------------- */

/* Find /sys/class/virtio-ports/<dev>/name == name and open /dev/<dev> (creating the node
 * from .../dev when there is no udev/devtmpfs node). */
static int console_open(const char *name)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    int fd = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], buf[256];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int nfd = open(path, O_RDONLY | O_CLOEXEC);
        if (nfd < 0)
            continue;
        ssize_t n = read(nfd, buf, sizeof buf - 1);
        close(nfd);
        if (n <= 0)
            continue;
        buf[n] = 0;
        buf[strcspn(buf, "\n")] = 0;
        if (strcmp(buf, name))
            continue;
        char dev[300];
        snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
        fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0 && errno == ENOENT) {
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/dev", e->d_name);
            unsigned maj, min;
            FILE *f = fopen(path, "re");
            if (f && fscanf(f, "%u:%u", &maj, &min) == 2 &&
                mknod(dev, S_IFCHR | 0600, makedev(maj, min)) == 0)
                fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            if (f)
                fclose(f);
        }
        if (fd < 0 && !g_serve.con_logged)
            logmsg("cannot open %s (port %s): %s", dev, name, strerror(errno));
        break;
    }
    closedir(d);
    return fd;
}

static void console_set_async(bool on)
{
    int fl = fcntl(g_serve.con_fd, F_GETFL);
    if (fl >= 0)
        fcntl(g_serve.con_fd, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC);
}

/* Read returned 0: no host is connected right now. The processes of the session die, but the
 * session itself lives on with its unread input and unsent output: the guest kernel may have
 * handed us the next host's data (even its HELLO) before it processed that host's "port open"
 * notice, so the HELLO reply queued for it must survive. A new host starts with RESET anyway,
 * and skips whatever old output reaches it before its HELLO reply. */
void console_hangup(void)
{
    debugmsg("console: host disconnected");
    if (g_serve.con_sess)
        while (g_serve.con_sess->chans)
            chan_cancel(g_serve.con_sess->chans);
    g_serve.con_state = CON_IDLE;
    console_set_async(true); /* SIGIO when the host connects again */
    g_serve.con_retry_at = now_ms(); /* and check at once: it may be back already */
}

/* The port itself failed: close it (the kernel drops its buffers) and start over later. */
void console_reopen(void)
{
    if (g_serve.con_sess)
        session_end(g_serve.con_sess);
    if (g_serve.con_fd >= 0)
        close(g_serve.con_fd);
    g_serve.con_fd = -1;
    g_serve.con_state = CON_NONE;
    g_serve.con_retry_at = now_ms() + CONSOLE_REOPEN_MS;
}

/* Called on timer or SIGIO: open the port, or notice that the host has connected. */
void console_check(void)
{
    if (!g_serve.opts->console)
        return;
    int64_t now = now_ms();
    if (g_serve.con_state == CON_NONE) {
        if (now < g_serve.con_retry_at)
            return;
        g_serve.con_fd = console_open(g_serve.opts->port_name);
        if (g_serve.con_fd < 0) {
            if (!g_serve.con_logged)
                logmsg("virtio console port %s not found yet; retrying", g_serve.opts->port_name);
            g_serve.con_logged = true;
            g_serve.con_retry_at = now + CONSOLE_REOPEN_MS;
            return;
        }
        g_serve.con_logged = false;
        fcntl(g_serve.con_fd, F_SETOWN, getpid());
        console_set_async(true);
        g_serve.con_state = CON_IDLE;
        debugmsg("console: opened port %s", g_serve.opts->port_name);
    }
    if (g_serve.con_state != CON_IDLE)
        return;
    struct pollfd p = {.fd = g_serve.con_fd, .events = POLLIN};
    if (poll(&p, 1, 0) < 0)
        return;
    if (p.revents & (POLLERR | POLLNVAL)) {
        console_reopen();
        return;
    }
    if (p.revents & POLLHUP) { /* nobody on the host side yet */
        g_serve.con_retry_at = now + CONSOLE_RECHECK_MS;
        return;
    }
    if (!g_serve.con_sess &&
        !(g_serve.con_sess = session_new(SESS_CONSOLE, g_serve.con_fd, g_serve.con_fd))) {
        g_serve.con_retry_at = now + CONSOLE_REOPEN_MS;
        return;
    }
    console_set_async(false);
    g_serve.con_state = CON_UP;
    debugmsg("console: host connected");
}

/* ---- listeners ----------------------------------------------------------------------------- */

/* Only the host may open agent sessions over vsock: not a process of this guest (loopback,
 * CID 1, or the guest's own CID) nor another VM. `a` is what accept() reported. */
static bool vsock_peer_is_host(const struct sockaddr_storage *a, socklen_t len)
{
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)a;
    return len >= (socklen_t)sizeof *vm && vm->svm_family == AF_VSOCK &&
           vm->svm_cid == VMADDR_CID_HOST;
}

void vsock_check(void)
{
    if (!g_serve.opts->vsock || g_serve.vsock_fd >= 0 || now_ms() < g_serve.vsock_retry_at)
        return;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = g_serve.opts->vsock_port;
    if (fd >= 0)
        vsock_tune(fd);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 16) < 0) {
        if (!g_serve.vsock_logged)
            logmsg("vsock port %u unavailable (%s); retrying", g_serve.opts->vsock_port,
                   strerror(errno));
        g_serve.vsock_logged = true;
        if (fd >= 0)
            close(fd);
        g_serve.vsock_retry_at = now_ms() + VSOCK_RETRY_MS;
        return;
    }
    g_serve.vsock_fd = fd;
    debugmsg("listening on vsock port %u", g_serve.opts->vsock_port);
}

int unix_listen(const char *path)
{
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a.sun_path) {
        logmsg("unix socket path too long: %s", path);
        return -1;
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 16) < 0) {
        logmsg("cannot listen on %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Connections still owing their AUTH each hold a frame buffer, so at most this many wait: a
 * new one ends the oldest (rather than being refused, so a flood of idle connections cannot
 * lock the host out; its AUTH comes with its first packet). */
#define AUTH_PENDING_MAX 16

static void limit_pending_auth(void)
{
    int n = 0;
    struct session *oldest = NULL; /* sessions are prepended: the last one found */
    for (struct session *s = g_serve.sessions; s; s = s->next) {
        if (s->need_auth && !s->authed && !s->closing) {
            n++;
            oldest = s;
        }
    }
    if (n >= AUTH_PENDING_MAX) {
        logmsg("%d connections have not authenticated: closing the oldest", n);
        session_end(oldest);
    }
}

void on_accept(int lfd, bool vsock)
{
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        memset(&peer, 0, sizeof peer);
        int fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                logmsg("accept: %s", strerror(errno));
            return;
        }
        if (vsock && !vsock_peer_is_host(&peer, len)) {
            const struct sockaddr_vm *vm = (const struct sockaddr_vm *)&peer;
            logmsg("refused a vsock connection from CID %u port %u: only the host (CID %u) "
                   "may connect", vm->svm_cid, vm->svm_port, VMADDR_CID_HOST);
            close(fd);
            continue;
        }
        if (g_serve.opts->key_file)
            limit_pending_auth();
        struct session *s = session_new(SESS_SOCKET, fd, fd);
        if (!s) {
            logmsg("out of memory for a new session");
            close(fd);
            continue;
        }
        s->need_auth = g_serve.opts->key_file != NULL;
        s->auth_by_ms = s->need_auth ? now_ms() + AUTH_TIMEOUT_MS : 0;
    }
}
