/* vzkit-agent: channels — bookkeeping, data in both directions (pipes, files), file reads and
 * writes. Exec'd processes are in exec.c. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- channel bookkeeping -------------------------------------------------------------------- */

struct chan *chan_new(struct session *s, uint32_t id, enum chan_kind kind)
{
    struct chan *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->sess = s;
    c->id = id;
    c->kind = kind;
    c->fd[0] = c->fd[1] = c->in_fd = c->pty_fd = c->wfd = -1;
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
    close_fd(&c->pty_fd);
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

void chan_cancel(struct chan *c)
{
    pid_t pgid = c->pid ? c->pid : c->exit_pgid;
    if (c->kind == CH_EXEC && pgid > 0)
        kill(-pgid, SIGKILL);
    if (c->kind == CH_EXEC && c->pid > 0)
        kill(c->pid, SIGKILL);
    if (c->kind == CH_TCP) { /* the host abandoned the connection: reset it, as it was */
        struct linger abort_now = {.l_onoff = 1, .l_linger = 0};
        int fd = c->fd[STREAM_OUT] >= 0 ? c->fd[STREAM_OUT] : c->in_fd;
        if (fd >= 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_now, sizeof abort_now);
    }
    if (c->kind == CH_WRITE && c->tmp_path) {
        close_fd(&c->wfd);
        unlink(c->tmp_path);
    }
    chan_free(c);
}

/* ---- data in both directions ------------------------------------------------------------------ */

/* Frames read from a child's pipe (or a file) per wake-up while it has more: they go out in
 * one write (wire.c, flush_output). */
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
    if (n < 0 && errno == EIO && c->pty_fd >= 0)
        n = 0; /* a pty master reads EIO once every slave is closed: its end of file */
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

/* Whether `n` bytes of stdin may go straight into the child's pipe (splice, see session.c): an
 * exec channel with an open stdin that is a pipe (splice cannot write a socket into a pty), nothing queued before them, within the window, and a pipe
 * that holds less than a window (one fed from a socket can take more than its size). */
bool chan_stdin_direct(const struct chan *c, size_t n)
{
    int piped = 0;
    return c->kind == CH_EXEC && c->pty_fd < 0 && c->in_fd >= 0 && !c->in_eof && !c->in_head &&
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
