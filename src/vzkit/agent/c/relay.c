/* vzkit-agent relay: bridge a stream connection to `/bin/sh -c CMD`'s stdin/stdout.
 *
 * --listen-*: accept connections forever, one forked bridge per connection.
 * --connect-*: one connection; the relay exits with the command's status.
 * Half-close both ways: EOF from the peer closes the command's stdin; EOF on the command's
 * stdout shuts down the write side of the connection.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUF 65536

struct pipe_dir { /* one direction: src -> buf -> dst */
    int src, dst;
    unsigned char buf[BUF];
    size_t len, off;
    bool src_eof;
};

static int spawn_shell(const char *cmd, int *to_child, int *from_child)
{
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(out, O_CLOEXEC) < 0) {
        close(in[0]);
        close(in[1]);
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        reset_child_signals();
        dup2(in[0], 0);
        dup2(out[1], 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        dprintf(2, "vzkit-agent: exec /bin/sh: %s\n", strerror(errno));
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    *to_child = in[1];
    *from_child = out[0];
    return pid;
}

static int wait_status(pid_t pid, int options, int *status)
{
    pid_t r;
    do
        r = waitpid(pid, status, options);
    while (r < 0 && errno == EINTR);
    return r;
}

/* Returns the command's exit status (128+N for a signal). */
static int bridge(int conn, const char *cmd)
{
    struct pipe_dir *up = calloc(1, sizeof *up), *down = calloc(1, sizeof *down);
    int to_child = -1, from_child = -1;
    pid_t pid = up && down ? spawn_shell(cmd, &to_child, &from_child) : -1;
    if (pid < 0) {
        logmsg("relay: cannot start the command: %s", strerror(errno));
        free(up);
        free(down);
        close(conn);
        return 127;
    }
    set_nonblock(conn);
    set_nonblock(to_child);
    set_nonblock(from_child);
    up->src = conn; /* peer -> command stdin */
    up->dst = to_child;
    down->src = from_child; /* command stdout -> peer */
    down->dst = conn;
    int status = 0;
    bool reaped = false;
    while (up->dst >= 0 || down->src >= 0 || down->len) {
        struct pollfd p[4];
        int np = 0, iu_in = -1, iu_out = -1, id_in = -1, id_out = -1;
        if (up->dst >= 0 && !up->len && !up->src_eof) {
            p[np] = (struct pollfd){.fd = up->src, .events = POLLIN};
            iu_in = np++;
        }
        if (up->dst >= 0 && up->len) {
            p[np] = (struct pollfd){.fd = up->dst, .events = POLLOUT};
            iu_out = np++;
        }
        if (down->src >= 0 && !down->len) {
            p[np] = (struct pollfd){.fd = down->src, .events = POLLIN};
            id_in = np++;
        }
        if (down->len) {
            p[np] = (struct pollfd){.fd = down->dst, .events = POLLOUT};
            id_out = np++;
        }
        /* once the command's output is done and it has exited, stdin no longer matters */
        bool down_done = down->src < 0 && !down->len;
        if (down_done && !reaped && wait_status(pid, WNOHANG, &status) == pid)
            reaped = true;
        if (down_done && reaped)
            break;
        if (poll(p, (nfds_t)np, down_done ? 100 : -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (iu_in >= 0 && p[iu_in].revents) {
            ssize_t n = read(up->src, up->buf, BUF);
            if (n > 0) {
                up->len = (size_t)n;
                up->off = 0;
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                up->src_eof = true;
            }
        }
        if (iu_out >= 0 && p[iu_out].revents) {
            ssize_t n = write(up->dst, up->buf + up->off, up->len - up->off);
            if (n > 0) {
                up->off += (size_t)n;
                if (up->off == up->len)
                    up->len = up->off = 0;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                up->len = up->off = 0; /* the command closed its stdin */
                up->src_eof = true;
                close(up->dst);
                up->dst = -1;
            }
        }
        if (up->dst >= 0 && up->src_eof && !up->len) {
            close(up->dst); /* half-close towards the command */
            up->dst = -1;
        }
        if (id_in >= 0 && p[id_in].revents) {
            ssize_t n = read(down->src, down->buf, BUF);
            if (n > 0) {
                down->len = (size_t)n;
                down->off = 0;
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(down->src);
                down->src = -1;
                shutdown(conn, SHUT_WR); /* half-close towards the peer */
            }
        }
        if (id_out >= 0 && p[id_out].revents) {
            ssize_t n = write(down->dst, down->buf + down->off, down->len - down->off);
            if (n > 0) {
                down->off += (size_t)n;
                if (down->off == down->len)
                    down->len = down->off = 0;
                if (!down->len && down->src < 0)
                    shutdown(conn, SHUT_WR);
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                down->len = down->off = 0; /* the peer is gone */
                if (down->src >= 0) {
                    close(down->src);
                    down->src = -1;
                }
            }
        }
    }
    if (up->dst >= 0)
        close(up->dst);
    if (down->src >= 0)
        close(down->src);
    close(conn);
    free(up);
    free(down);
    if (!reaped && wait_status(pid, 0, &status) < 0)
        return 127;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int make_addr(const char *kind, const char *spec, bool listening,
                     struct sockaddr_storage *ss, socklen_t *len, int *family)
{
    memset(ss, 0, sizeof *ss);
    if (!strcmp(kind, "unix")) {
        struct sockaddr_un *a = (struct sockaddr_un *)ss;
        if (strlen(spec) >= sizeof a->sun_path)
            return -1;
        a->sun_family = AF_UNIX;
        strcpy(a->sun_path, spec);
        *len = sizeof *a;
        *family = AF_UNIX;
        return 0;
    }
    struct sockaddr_vm *a = (struct sockaddr_vm *)ss;
    unsigned long cid = (unsigned long)VMADDR_CID_ANY, port;
    char *end;
    const char *ps = spec;
    if (!listening) {
        cid = strtoul(spec, &end, 10);
        if (end == spec || *end != ':')
            return -1;
        ps = end + 1;
    }
    port = strtoul(ps, &end, 10);
    if (end == ps || *end || port > 0xffffffffu || cid > 0xffffffffu)
        return -1;
    a->svm_family = AF_VSOCK;
    a->svm_cid = (unsigned)cid;
    a->svm_port = (unsigned)port;
    *len = sizeof *a;
    *family = AF_VSOCK;
    return 0;
}

int relay_main(int argc, char **argv)
{
    const char *mode = NULL, *spec = NULL, *cmd = NULL;
    for (int i = 2; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v && (!strcmp(argv[i], "--listen-vsock") || !strcmp(argv[i], "--connect-vsock") ||
                  !strcmp(argv[i], "--listen-unix") || !strcmp(argv[i], "--connect-unix"))) {
            mode = argv[i] + 2;
            spec = v;
            i++;
        } else if (v && !strcmp(argv[i], "--exec")) {
            cmd = v;
            i++;
        } else if (v && !strcmp(argv[i], "--vsock-buffer")) {
            if (set_vsock_buffer(v) < 0)
                return 2;
            i++;
        } else if (!strcmp(argv[i], "--verbose") || !strcmp(argv[i], "-v")) {
            g_verbose = true;
        } else {
            mode = NULL;
            break;
        }
    }
    if (!mode || !cmd) {
        logmsg("usage: vzkit-agent relay (--listen-vsock PORT | --connect-vsock CID:PORT | "
               "--listen-unix PATH | --connect-unix PATH) --exec CMD [--vsock-buffer BYTES]");
        return 2;
    }
    bool listening = !strncmp(mode, "listen", 6);
    const char *kind = strchr(mode, '-') + 1;
    struct sockaddr_storage ss;
    socklen_t alen;
    int family;
    if (make_addr(kind, spec, listening, &ss, &alen, &family) < 0) {
        logmsg("relay: bad address %s for --%s", spec, mode);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        logmsg("relay: socket: %s", strerror(errno));
        return 1;
    }
    if (family == AF_VSOCK)
        vsock_tune(fd);
    if (!listening) {
        if (connect(fd, (struct sockaddr *)&ss, alen) < 0) {
            logmsg("relay: connect %s: %s", spec, strerror(errno));
            return 1;
        }
        return bridge(fd, cmd);
    }
    if (family == AF_UNIX)
        unlink(spec);
    if (bind(fd, (struct sockaddr *)&ss, alen) < 0 || listen(fd, 128) < 0) {
        logmsg("relay: listen %s: %s", spec, strerror(errno));
        return 1;
    }
    signal(SIGCHLD, SIG_IGN); /* bridges are reaped automatically */
    for (;;) {
        int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno != EINTR && errno != ECONNABORTED) {
                logmsg("relay: accept: %s", strerror(errno));
                sleep(1);
            }
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(fd);
            signal(SIGCHLD, SIG_DFL);
            _exit(bridge(conn, cmd));
        }
        if (pid < 0)
            logmsg("relay: fork: %s", strerror(errno));
        close(conn);
    }
}
