/* vzkit-agent serve: one process, one poll() loop, non-blocking file descriptors.
 *
 * Transports (each connection is a session): AF_VSOCK listener, the virtio console port (one
 * session at a time, re-opened/re-armed when the host side goes away), a unix listener or
 * stdin/stdout for tests. Sessions and channels are unlinked when they end and freed at the end
 * of the loop iteration, so poll entries never point at freed memory.
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define OUT_LIMIT (1024u * 1024u) /* stop producing for a session above this many queued bytes */
#define CLOSE_GRACE_MS 2000
#define CONSOLE_RECHECK_MS 250
#define CONSOLE_REOPEN_MS 1000
#define VSOCK_RETRY_MS 2000

enum con_state { CON_NONE, CON_IDLE, CON_UP };

static struct {
    const struct serve_opts *opts;
    struct session *sessions;
    struct session *grave_sessions;
    struct chan *grave_chans;
    int sigpipe[2];
    int unix_fd, vsock_fd;
    int64_t vsock_retry_at;
    bool vsock_logged;
    int con_fd;
    enum con_state con_state;
    int64_t con_retry_at;
    bool con_logged;
    struct session *con_sess;
    bool quit;
} G = {.unix_fd = -1, .vsock_fd = -1, .con_fd = -1};

size_t session_out_limit(void) { return OUT_LIMIT; }

/* ---- output queue ------------------------------------------------------------------------ */

#define BUF_POOLED_MAX (HDR_SIZE + MAX_PAYLOAD) /* a whole frame */
#define BUF_POOLED_MIN (16u * 1024u)
#define POOL_MAX 24 /* buffers kept: a session's queue (OUT_LIMIT) and a read batch, 1.5 MiB */

static struct buf *g_pool[POOL_MAX];
static int g_pooled;

struct buf *buf_new(size_t len)
{
    bool pooled = len >= BUF_POOLED_MIN && len <= BUF_POOLED_MAX;
    struct buf *b = pooled && g_pooled ? g_pool[--g_pooled]
                                       : malloc(sizeof *b + (pooled ? BUF_POOLED_MAX : len));
    if (b) {
        b->next = NULL;
        b->len = len;
        b->off = 0;
        b->pooled = pooled;
    }
    return b;
}

void buf_free(struct buf *b)
{
    if (b->pooled && g_pooled < POOL_MAX)
        g_pool[g_pooled++] = b;
    else
        free(b);
}

static void fill_header(unsigned char *h, uint8_t type, uint32_t id, size_t n)
{
    put_u32(h, (uint32_t)n);
    h[4] = type;
    h[5] = h[6] = h[7] = 0;
    put_u32(h + 8, id);
}

static void enqueue(struct session *s, struct buf *b)
{
    b->next = NULL;
    if (s->out_tail)
        s->out_tail->next = b;
    else
        s->out_head = b;
    s->out_tail = b;
    s->out_bytes += b->len;
}

int send_frame2(struct session *s, uint8_t type, uint32_t id, const void *p1, size_t n1,
                const void *p2, size_t n2)
{
    if (s->dead)
        return 0;
    if (n1 + n2 > MAX_PAYLOAD)
        n2 = MAX_PAYLOAD - n1; /* only ever truncates error messages */
    struct buf *b = buf_new(HDR_SIZE + n1 + n2);
    if (!b) {
        logmsg("out of memory queueing a frame");
        return -1;
    }
    fill_header(b->data, type, id, n1 + n2);
    if (n1)
        memcpy(b->data + HDR_SIZE, p1, n1);
    if (n2)
        memcpy(b->data + HDR_SIZE + n1, p2, n2);
    enqueue(s, b);
    return 0;
}

int send_frame(struct session *s, uint8_t type, uint32_t id, const void *p, size_t n)
{
    return send_frame2(s, type, id, p, n, NULL, 0);
}

int send_error(struct session *s, uint32_t id, int err, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    unsigned char e[4];
    put_u32(e, (uint32_t)err);
    debugmsg("error on channel %u: %s", id, msg);
    return send_frame2(s, T_ERROR, id, e, 4, msg, strlen(msg));
}

int send_window(struct session *s, uint32_t id, uint32_t inc, uint32_t stream)
{
    unsigned char p[8];
    put_u32(p, inc);
    put_u32(p + 4, stream);
    return send_frame(s, T_WINDOW, id, p, 8);
}

ssize_t send_from_fd(struct session *s, uint8_t type, uint32_t id, int fd, size_t max)
{
    /* A full frame is 64 KiB with its header: one virtio-vsock packet (Linux sends at most
     * 64 KiB per packet), where 64 KiB of payload would cost a second, 12-byte packet. */
    if (max > DATA_FRAME_PAYLOAD)
        max = DATA_FRAME_PAYLOAD;
    struct buf *b = buf_new(HDR_SIZE + max);
    if (!b) {
        errno = ENOMEM;
        return -1;
    }
    ssize_t n;
    do
        n = read(fd, b->data + HDR_SIZE, max);
    while (n < 0 && errno == EINTR);
    if (n <= 0) {
        int e = errno;
        buf_free(b);
        errno = e;
        return n;
    }
    b->len = HDR_SIZE + (size_t)n;
    fill_header(b->data, type, id, (size_t)n);
    enqueue(s, b);
    return n;
}

/* Drop queued frames, except one already partly written (the stream must stay framed). */
static void drop_output(struct session *s)
{
    struct buf *keep = s->out_head && s->out_head->off ? s->out_head : NULL;
    struct buf *b = keep ? keep->next : s->out_head;
    while (b) {
        struct buf *next = b->next;
        buf_free(b);
        b = next;
    }
    s->out_head = s->out_tail = keep;
    s->out_bytes = keep ? keep->len - keep->off : 0;
    if (keep)
        keep->next = NULL;
}

/* Write queued frames until the fd would block, several per system call: on vsock one send
 * of N frames is N packets for one wake-up of the guest kernel's send worker. Returns -1 when
 * the peer is gone. */
#define FLUSH_IOV 8

static int flush_output(struct session *s)
{
    while (s->out_head) {
        struct iovec iov[FLUSH_IOV];
        int cnt = 0;
        for (struct buf *b = s->out_head; b && cnt < FLUSH_IOV; b = b->next, cnt++) {
            iov[cnt].iov_base = b->data + b->off;
            iov[cnt].iov_len = b->len - b->off;
        }
        ssize_t n = writev(s->wfd, iov, cnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            debugmsg("session write: %s", strerror(errno));
            return -1;
        }
        s->out_bytes -= (size_t)n;
        while (n > 0) {
            struct buf *b = s->out_head;
            size_t left = b->len - b->off;
            if ((size_t)n < left) {
                b->off += (size_t)n;
                break;
            }
            n -= (ssize_t)left;
            s->out_head = b->next;
            if (!s->out_head)
                s->out_tail = NULL;
            buf_free(b);
        }
    }
    return 0;
}

/* ---- sessions ---------------------------------------------------------------------------- */

static struct session *session_new(enum sess_kind kind, int rfd, int wfd)
{
    struct session *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->in = malloc(HDR_SIZE + MAX_PAYLOAD);
    if (!s->in) {
        free(s);
        return NULL;
    }
    s->kind = kind;
    s->rfd = rfd;
    s->wfd = wfd;
    s->next = G.sessions;
    G.sessions = s;
    debugmsg("session %p started (%s)", (void *)s,
             kind == SESS_CONSOLE ? "console" : kind == SESS_STDIO ? "stdio" : "socket");
    return s;
}

/* End every channel of a session: kill its processes, drop temp files. */
static void session_reset(struct session *s)
{
    while (s->chans)
        chan_cancel(s->chans);
    drop_output(s);
    s->hello = false;
    s->closing = false;
    s->poweroff = false;
}

#define DRAIN_LIMIT (4u * 1024u * 1024u)

static void session_end(struct session *s)
{
    if (s->dead)
        return;
    debugmsg("session %p ended", (void *)s);
    session_reset(s);
    s->dead = true;
    for (struct session **pp = &G.sessions; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    if (s->kind == SESS_CONSOLE) {
        G.con_sess = NULL; /* the port stays open: console_check starts the next session */
        if (G.con_state == CON_UP) {
            G.con_state = CON_IDLE;
            G.con_retry_at = now_ms();
        }
    } else {
        /* Unread input would turn the close into a reset, and the peer could lose the frames
         * still on their way to it (an ERROR, say): take in what has arrived first. */
        size_t drained = 0;
        ssize_t n;
        while (s->kind == SESS_SOCKET && drained < DRAIN_LIMIT &&
               (n = recv(s->rfd, s->in, HDR_SIZE + MAX_PAYLOAD, MSG_DONTWAIT)) > 0)
            drained += (size_t)n;
        close(s->rfd);
        if (s->wfd != s->rfd)
            close(s->wfd);
    }
    if (s->kind == SESS_STDIO)
        G.quit = true;
    s->next = G.grave_sessions;
    G.grave_sessions = s;
}

/* A protocol violation: report it on channel 0, then end the session (sockets) or go back to
 * waiting for a HELLO (the console, which the guest cannot hang up). */
static void session_fatal(struct session *s, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void session_fatal(struct session *s, int err, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    logmsg("closing session: %s", msg);
    while (s->chans)
        chan_cancel(s->chans);
    s->hello = false;
    if (send_error(s, 0, err, "%s", msg) < 0) {
        session_end(s);
        return;
    }
    if (s->kind != SESS_CONSOLE) {
        s->closing = true;
        s->close_by_ms = now_ms() + CLOSE_GRACE_MS;
    }
}

/* ---- frames ------------------------------------------------------------------------------- */

static void reply_hello(struct session *s, const unsigned char *p, size_t n)
{
    if (n < PROTO_MAGIC_LEN + 4 || memcmp(p, PROTO_MAGIC, PROTO_MAGIC_LEN) != 0) {
        session_fatal(s, EPROTO, "bad HELLO (no magic)");
        return;
    }
    unsigned major = (unsigned)p[8] | (unsigned)p[9] << 8;
    if (major != PROTO_MAJOR) {
        session_fatal(s, EPROTONOSUPPORT, "protocol %u is not supported (agent speaks %d.%d)",
                      major, PROTO_MAJOR, PROTO_MINOR);
        return;
    }
    unsigned char r[PROTO_MAGIC_LEN + 12 + PROTO_NONCE_LEN];
    memcpy(r, PROTO_MAGIC, PROTO_MAGIC_LEN);
    r[8] = PROTO_MAJOR;
    r[9] = 0;
    r[10] = PROTO_MINOR;
    r[11] = 0;
    put_u32(r + 12, MAX_PAYLOAD);
    put_u32(r + 16, IN_WINDOW);
    memset(r + 20, 0, PROTO_NONCE_LEN);
    size_t nonce = n - (PROTO_MAGIC_LEN + 4);
    memcpy(r + 20, p + PROTO_MAGIC_LEN + 4, nonce < PROTO_NONCE_LEN ? nonce : PROTO_NONCE_LEN);
    s->hello = true;
    send_frame2(s, T_HELLO, 0, r, sizeof r, AGENT_VERSION, strlen(AGENT_VERSION));
}

/* ---- peer checks -------------------------------------------------------------------------- */

/* Only the host may open agent sessions over vsock: not a process of this guest (loopback,
 * CID 1, or the guest's own CID) nor another VM. `a` is what accept() reported. */
static bool vsock_peer_is_host(const struct sockaddr_storage *a, socklen_t len)
{
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)a;
    return len >= (socklen_t)sizeof *vm && vm->svm_family == AF_VSOCK &&
           vm->svm_cid == VMADDR_CID_HOST;
}

/* Whether `p` is the key in opts->key_file. The file is read at every AUTH: after a snapshot
 * restore the host serves a new key there (QEMU's fw_cfg is not part of the saved state), so
 * the old one stops working at once. Compared in constant time; an unreadable or empty file
 * matches nothing. */
static bool auth_key_matches(const unsigned char *p, size_t n)
{
    unsigned char key[AUTH_KEY_MAX + 1];
    int fd = open(G.opts->key_file, O_RDONLY | O_CLOEXEC);
    ssize_t len = -1;
    if (fd >= 0) {
        do
            len = read(fd, key, sizeof key);
        while (len < 0 && errno == EINTR);
        close(fd);
    }
    if (len <= 0 || len > AUTH_KEY_MAX) {
        logmsg("no usable key in %s (%s): refusing the connection", G.opts->key_file,
               len < 0 ? strerror(errno) : len ? "too long" : "empty");
        return false;
    }
    unsigned char diff = n != (size_t)len; /* the length is not secret: always 32 */
    for (size_t i = 0; i < (size_t)len; i++)
        diff |= (unsigned char)(key[i] ^ (i < n ? p[i] : 0));
    explicit_bzero(key, sizeof key);
    return diff == 0;
}

/* The first frame of a connection that needs a key must be a good AUTH (answered with OK on
 * channel 0); anything else ends the connection with ERROR before it could run anything.
 * Returns whether the frame was consumed. */
static bool check_auth(struct session *s, uint8_t type, uint32_t id, const unsigned char *p,
                       size_t n)
{
    if (type != T_AUTH) {
        if (s->need_auth && !s->authed) {
            session_fatal(s, EACCES, "authentication required (AUTH before message type 0x%02x)",
                          type);
            return true;
        }
        return false;
    }
    if (id != 0 || s->authed || s->hello) {
        session_fatal(s, EPROTO, "AUTH is only allowed as the first frame");
        return true;
    }
    if (s->need_auth && !auth_key_matches(p, n)) {
        session_fatal(s, EACCES, "authentication failed");
        return true;
    }
    s->authed = true; /* a session that needs no key ignores the key, but answers too */
    s->auth_by_ms = 0;
    send_frame(s, T_OK, 0, NULL, 0);
    return true;
}

static bool needs_channel(uint8_t type)
{
    switch (type) {
    case T_EXEC:
    case T_READ_FILE:
    case T_WRITE_FILE:
    case T_PING:
    case T_SYNC:
    case T_POWEROFF:
        return true;
    default:
        return false;
    }
}

static void handle_frame(struct session *s, uint8_t type, uint32_t id, const unsigned char *p,
                         size_t n)
{
    if (check_auth(s, type, id, p, n))
        return;
    if (type == T_RESET && id == 0 && n == 0) {
        /* The host may have been replaced without a hang-up we could see (console, snapshot
         * restore): it resets, and we forget the old session. */
        if (s->hello) {
            debugmsg("session reset by the host");
            session_reset(s);
        }
        s->resync = true;
        return;
    }
    if (type == T_HELLO) {
        if (id != 0) {
            session_fatal(s, EPROTO, "HELLO on channel %u", id);
            return;
        }
        if (s->hello) {
            if (s->kind != SESS_CONSOLE) {
                session_fatal(s, EPROTO, "duplicate HELLO");
                return;
            }
            /* the console host reconnected faster than we noticed: a fresh session */
            session_reset(s);
        }
        reply_hello(s, p, n);
        return;
    }
    if (!s->hello) {
        session_fatal(s, EPROTO, "expected HELLO, got message type 0x%02x", type);
        return;
    }
    if (needs_channel(type)) {
        if (id == 0) {
            session_fatal(s, EPROTO, "message type 0x%02x on channel 0", type);
            return;
        }
        if (chan_find(s, id)) {
            session_fatal(s, EPROTO, "channel %u is already in use", id);
            return;
        }
    }
    struct chan *c = NULL;
    int rc = 0;
    switch (type) {
    case T_PING:
        send_frame(s, T_PONG, id, AGENT_VERSION, strlen(AGENT_VERSION));
        return;
    case T_SYNC:
        sync();
        send_frame(s, T_OK, id, NULL, 0);
        return;
    case T_POWEROFF:
        send_frame(s, T_OK, id, NULL, 0);
        s->poweroff = true;
        s->close_by_ms = now_ms() + CLOSE_GRACE_MS;
        return;
    case T_EXEC:
        rc = chan_exec(s, id, p, n);
        break;
    case T_READ_FILE:
        rc = chan_read_file(s, id, p, n);
        break;
    case T_WRITE_FILE:
        rc = chan_write_file(s, id, p, n);
        break;
    case T_STDIN:
    case T_FILE_DATA:
    case T_STDIN_EOF:
    case T_FILE_END:
        c = chan_find(s, id);
        if (!c)
            return; /* the channel ended while this was in flight */
        if (type == T_STDIN_EOF)
            rc = chan_stdin_eof(s, c);
        else
            rc = chan_data(s, c, type, p, n);
        break;
    case T_WINDOW:
        if (n != 8) {
            session_fatal(s, EPROTO, "malformed WINDOW (%zu bytes)", n);
            return;
        }
        c = chan_find(s, id);
        if (c && c->kind != CH_WRITE) {
            uint32_t stream = get_u32(p + 4);
            if (stream > STREAM_ERR) {
                session_fatal(s, EPROTO, "WINDOW for unknown stream %u", stream);
                return;
            }
            c->window[stream] += get_u32(p);
        }
        return;
    case T_KILL:
        if (n != 8) {
            session_fatal(s, EPROTO, "malformed KILL (%zu bytes)", n);
            return;
        }
        c = chan_find(s, id);
        if (c)
            chan_kill(c, (int)get_u32(p), get_u32(p + 4) & KILL_GROUP);
        return;
    case T_CANCEL:
        c = chan_find(s, id);
        if (c)
            chan_cancel(c);
        return;
    default:
        session_fatal(s, EPROTO, "unknown message type 0x%02x", type);
        return;
    }
    if (rc == -2)
        session_fatal(s, EPROTO, "channel %u overran its window", id);
    else if (rc < 0)
        session_fatal(s, EPROTO, "malformed message type 0x%02x on channel %u", type, id);
}

/* On the console and after a RESET, bytes before a HELLO are skipped (a previous host may have
 * left a partial frame). Moves *pos to the first plausible HELLO header and returns true, or
 * past everything that cannot start one and returns false. */
static bool resync_to_hello(struct session *s, size_t *pos)
{
    const unsigned char *b = s->in;
    size_t need = HDR_SIZE + PROTO_MAGIC_LEN;
    for (size_t i = *pos; i + need <= s->in_len; i++) {
        if (b[i + 4] == T_HELLO && !b[i + 5] && !b[i + 6] && !b[i + 7] && !get_u32(b + i + 8) &&
            get_u32(b + i) <= MAX_PAYLOAD &&
            !memcmp(b + i + HDR_SIZE, PROTO_MAGIC, PROTO_MAGIC_LEN)) {
            *pos = i;
            return true;
        }
    }
    if (s->in_len >= *pos + need) /* keep what may be the start of a HELLO */
        *pos = s->in_len - need + 1;
    return false;
}

static void process_input(struct session *s)
{
    size_t pos = 0;
    while (!s->dead && !s->closing && !s->poweroff) {
        if (!s->hello && (s->resync || s->kind == SESS_CONSOLE)) {
            size_t from = pos;
            bool found = resync_to_hello(s, &pos);
            s->skipped += pos - from;
            if (!found)
                break;
            if (s->skipped)
                debugmsg("skipped %zu bytes before HELLO", s->skipped);
            s->skipped = 0;
        }
        if (s->in_len - pos < HDR_SIZE)
            break;
        const unsigned char *h = s->in + pos;
        uint32_t len = get_u32(h);
        /* a bad header ends a socket session; the console resyncs from here */
        if (h[5] || h[6] || h[7]) {
            session_fatal(s, EPROTO, "malformed frame header (reserved bytes set)");
            continue;
        }
        if (len > MAX_PAYLOAD) {
            session_fatal(s, EMSGSIZE, "frame of %u bytes exceeds the maximum of %u", len,
                          MAX_PAYLOAD);
            continue;
        }
        /* An unauthenticated peer is judged by its first header: nothing more is buffered. */
        if (s->need_auth && !s->authed && h[4] != T_AUTH) {
            session_fatal(s, EACCES, "authentication required (AUTH before message type 0x%02x)",
                          h[4]);
            continue;
        }
        if (s->need_auth && !s->authed && len > AUTH_KEY_MAX) {
            session_fatal(s, EACCES, "authentication failed");
            continue;
        }
        if (s->in_len - pos < HDR_SIZE + len)
            break;
        pos += HDR_SIZE + len;
        handle_frame(s, h[4], get_u32(h + 8), h + HDR_SIZE, len);
    }
    if (s->dead || s->in_len == 0)
        return;
    if (s->closing || pos >= s->in_len) {
        s->in_len = 0;
    } else if (pos > 0) {
        memmove(s->in, s->in + pos, s->in_len - pos);
        s->in_len -= pos;
    }
}

static void console_hangup(void);
static void console_reopen(void);

/* Host -> agent stdin on a socket session goes from the socket straight into the child's stdin
 * pipe with splice(2) when nothing is queued before it: no copy through the agent, which on
 * vsock is most of what the agent costs the guest's vCPU per byte (docs/vsock.md). So that a
 * STDIN header can be seen before its payload is read, socket sessions read no further than
 * the end of the frame at hand. */
static bool stdin_header_buffered(const struct session *s)
{
    const unsigned char *h = s->in;
    return g_splice && s->kind == SESS_SOCKET && s->hello && s->in_len == HDR_SIZE &&
           h[4] == T_STDIN && !h[5] && !h[6] && !h[7] && get_u32(h) > 0 &&
           get_u32(h) <= MAX_PAYLOAD;
}

/* With a STDIN header buffered: splice what of its payload the socket has and the pipe takes;
 * what is left stays a (shorter) STDIN frame. False when nothing was buffered or the payload
 * must be read the ordinary way (the pipe is full, the channel takes no direct stdin, EOF or
 * an error, which that path reports); true when the event is handled. */
static bool splice_stdin(struct session *s)
{
    bool spliced = false;
    while (stdin_header_buffered(s)) {
        uint32_t len = get_u32(s->in);
        struct chan *c = chan_find(s, get_u32(s->in + 8));
        if (!c || !chan_stdin_direct(c, len))
            return false;
        ssize_t n;
        do
            n = splice(s->rfd, NULL, c->in_fd, NULL, len, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        while (n < 0 && errno == EINTR);
        if (n == 0 || (n < 0 && errno != EAGAIN))
            return false;
        if (n < 0) { /* the socket is empty for now (wait), or the pipe is full */
            struct pollfd p = {.fd = c->in_fd, .events = POLLOUT};
            return poll(&p, 1, 0) == 1 && (p.revents & POLLOUT);
        }
        chan_stdin_spliced(c, (size_t)n);
        spliced = true;
        if ((uint32_t)n == len)
            s->in_len = 0;
        else
            put_u32(s->in, len - (uint32_t)n);
    }
    return spliced; /* the whole frame went */
}

/* How much to read: up to the end of the frame at hand on a socket session (see above). */
static size_t read_room(const struct session *s)
{
    size_t room = HDR_SIZE + MAX_PAYLOAD - s->in_len;
    if (s->kind != SESS_SOCKET || !s->hello)
        return room;
    if (s->in_len < HDR_SIZE)
        return HDR_SIZE - s->in_len;
    uint32_t len = get_u32(s->in);
    size_t end = HDR_SIZE + (size_t)(len <= MAX_PAYLOAD ? len : MAX_PAYLOAD);
    return end > s->in_len ? end - s->in_len : room;
}

static void on_session_readable(struct session *s)
{
    if (splice_stdin(s))
        return;
    ssize_t n = read(s->rfd, s->in + s->in_len, read_room(s));
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        debugmsg("session read: %s", strerror(errno));
        if (s->kind == SESS_CONSOLE)
            console_reopen();
        else
            session_end(s);
        return;
    }
    if (n == 0) {
        if (s->kind == SESS_CONSOLE) {
            console_hangup();
        } else if (s->in_len > 0 && s->hello) {
            size_t want = s->in_len >= HDR_SIZE ? HDR_SIZE + get_u32(s->in) : HDR_SIZE;
            session_fatal(s, EPROTO, "truncated frame (connection closed after %zu of %zu bytes)",
                          s->in_len, want);
        } else {
            session_end(s);
        }
        return;
    }
    s->in_len += (size_t)n;
    if (splice_stdin(s))
        return;
    process_input(s);
}

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
        if (fd < 0 && !G.con_logged)
            logmsg("cannot open %s (port %s): %s", dev, name, strerror(errno));
        break;
    }
    closedir(d);
    return fd;
}

static void console_set_async(bool on)
{
    int fl = fcntl(G.con_fd, F_GETFL);
    if (fl >= 0)
        fcntl(G.con_fd, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC);
}

/* Read returned 0: no host is connected right now. The processes of the session die, but the
 * session itself lives on with its unread input and unsent output: the guest kernel may have
 * handed us the next host's data (even its HELLO) before it processed that host's "port open"
 * notice, so the HELLO reply queued for it must survive. A new host starts with RESET anyway,
 * and skips whatever old output reaches it before its HELLO reply. */
static void console_hangup(void)
{
    debugmsg("console: host disconnected");
    if (G.con_sess)
        while (G.con_sess->chans)
            chan_cancel(G.con_sess->chans);
    G.con_state = CON_IDLE;
    console_set_async(true); /* SIGIO when the host connects again */
    G.con_retry_at = now_ms(); /* and check at once: it may be back already */
}

/* The port itself failed: close it (the kernel drops its buffers) and start over later. */
static void console_reopen(void)
{
    if (G.con_sess)
        session_end(G.con_sess);
    if (G.con_fd >= 0)
        close(G.con_fd);
    G.con_fd = -1;
    G.con_state = CON_NONE;
    G.con_retry_at = now_ms() + CONSOLE_REOPEN_MS;
}

/* Called on timer or SIGIO: open the port, or notice that the host has connected. */
static void console_check(void)
{
    if (!G.opts->console)
        return;
    int64_t now = now_ms();
    if (G.con_state == CON_NONE) {
        if (now < G.con_retry_at)
            return;
        G.con_fd = console_open(G.opts->port_name);
        if (G.con_fd < 0) {
            if (!G.con_logged)
                logmsg("virtio console port %s not found yet; retrying", G.opts->port_name);
            G.con_logged = true;
            G.con_retry_at = now + CONSOLE_REOPEN_MS;
            return;
        }
        G.con_logged = false;
        fcntl(G.con_fd, F_SETOWN, getpid());
        console_set_async(true);
        G.con_state = CON_IDLE;
        debugmsg("console: opened port %s", G.opts->port_name);
    }
    if (G.con_state != CON_IDLE)
        return;
    struct pollfd p = {.fd = G.con_fd, .events = POLLIN};
    if (poll(&p, 1, 0) < 0)
        return;
    if (p.revents & (POLLERR | POLLNVAL)) {
        console_reopen();
        return;
    }
    if (p.revents & POLLHUP) { /* nobody on the host side yet */
        G.con_retry_at = now + CONSOLE_RECHECK_MS;
        return;
    }
    if (!G.con_sess && !(G.con_sess = session_new(SESS_CONSOLE, G.con_fd, G.con_fd))) {
        G.con_retry_at = now + CONSOLE_REOPEN_MS;
        return;
    }
    console_set_async(false);
    G.con_state = CON_UP;
    debugmsg("console: host connected");
}

/* ---- listeners ----------------------------------------------------------------------------- */

static void vsock_check(void)
{
    if (!G.opts->vsock || G.vsock_fd >= 0 || now_ms() < G.vsock_retry_at)
        return;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = G.opts->vsock_port;
    if (fd >= 0)
        vsock_tune(fd);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 16) < 0) {
        if (!G.vsock_logged)
            logmsg("vsock port %u unavailable (%s); retrying", G.opts->vsock_port,
                   strerror(errno));
        G.vsock_logged = true;
        if (fd >= 0)
            close(fd);
        G.vsock_retry_at = now_ms() + VSOCK_RETRY_MS;
        return;
    }
    G.vsock_fd = fd;
    debugmsg("listening on vsock port %u", G.opts->vsock_port);
}

static int unix_listen(const char *path)
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
    for (struct session *s = G.sessions; s; s = s->next) {
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

static void on_accept(int lfd, bool vsock)
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
        if (G.opts->key_file)
            limit_pending_auth();
        struct session *s = session_new(SESS_SOCKET, fd, fd);
        if (!s) {
            logmsg("out of memory for a new session");
            close(fd);
            continue;
        }
        s->need_auth = G.opts->key_file != NULL;
        s->auth_by_ms = s->need_auth ? now_ms() + AUTH_TIMEOUT_MS : 0;
    }
}

/* ---- signals and children -------------------------------------------------------------------- */

static void on_signal(int sig)
{
    int saved = errno;
    unsigned char c = (unsigned char)sig;
    (void)!write(G.sigpipe[1], &c, 1);
    errno = saved;
}

static void reap_children(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (struct session *s = G.sessions; s; s = s->next) {
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
    while ((n = read(G.sigpipe[0], buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == SIGCHLD)
                reap_children();
            else if (buf[i] == SIGIO)
                console_check();
            else if (buf[i] == SIGTERM || buf[i] == SIGINT || buf[i] == SIGHUP)
                G.quit = true;
        }
    }
}

static void kill_everything(void)
{
    while (G.sessions)
        session_end(G.sessions);
}

static void do_poweroff(struct session *s)
{
    s->poweroff = false;
    logmsg("powering off (requested by the host)");
    if (g_test_mode) {
        kill_everything();
        sync();
        G.quit = true;
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
    add_pfd(G.sigpipe[0], POLLIN, P_SIG, NULL, 0);
    if (G.unix_fd >= 0)
        add_pfd(G.unix_fd, POLLIN, P_LISTEN, NULL, 0);
    if (G.vsock_fd >= 0)
        add_pfd(G.vsock_fd, POLLIN, P_LISTEN, NULL, 1);
    else if (G.opts->vsock)
        deadline = min_deadline(deadline, G.vsock_retry_at);
    if (G.opts->console && G.con_state != CON_UP)
        deadline = min_deadline(deadline, G.con_retry_at ? G.con_retry_at : now_ms());
    for (struct session *s = G.sessions; s; s = s->next) {
        bool room = s->out_bytes < OUT_LIMIT;
        bool up = s->kind != SESS_CONSOLE || G.con_state == CON_UP;
        if (up && !s->closing && !s->poweroff && room)
            add_pfd(s->rfd, POLLIN, P_SESS_IN, s, 0);
        if (up && s->out_head)
            add_pfd(s->wfd, POLLOUT, P_SESS_OUT, s, 0);
        if (s->closing || s->poweroff)
            deadline = min_deadline(deadline, s->close_by_ms);
        else if (s->need_auth && !s->authed)
            deadline = min_deadline(deadline, s->auth_by_ms);
        for (struct chan *c = s->chans; c; c = c->next) {
            for (int k = 0; k < 2; k++)
                if (c->fd[k] >= 0 && c->window[k] > 0 && room)
                    add_pfd(c->fd[k], POLLIN, P_CHAN_OUT, c, k);
            if (c->in_fd >= 0 && c->in_head)
                add_pfd(c->in_fd, POLLOUT, P_CHAN_IN, c, 0);
            if (c->deadline_ms)
                deadline = min_deadline(deadline, c->deadline_ms);
        }
    }
    return deadline;
}

static void bury(void)
{
    while (G.grave_chans) {
        struct chan *c = G.grave_chans;
        G.grave_chans = c->next;
        free(c);
    }
    while (G.grave_sessions) {
        struct session *s = G.grave_sessions;
        G.grave_sessions = s->next;
        free(s->in);
        free(s);
    }
}

void chan_bury(struct chan *c)
{
    c->next = G.grave_chans;
    G.grave_chans = c;
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
        if (!c->dead)
            chan_on_readable(c, r->stream);
        break;
    }
    case P_CHAN_IN: {
        struct chan *c = r->obj;
        if (!c->dead)
            chan_on_stdin_writable(c);
        break;
    }
    }
}

static void after_events(void)
{
    int64_t now = now_ms();
    struct session *next;
    for (struct session *s = G.sessions; s; s = next) {
        next = s->next;
        struct chan *cn;
        for (struct chan *c = s->chans; c; c = cn) {
            cn = c->next;
            if (c->deadline_ms && now >= c->deadline_ms)
                chan_on_deadline(c, now);
        }
        bool up = s->kind != SESS_CONSOLE || G.con_state == CON_UP;
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
        if (s->closing && (!s->out_head || now >= s->close_by_ms)) {
            session_end(s);
        } else if (!s->closing && s->need_auth && !s->authed && now >= s->auth_by_ms) {
            logmsg("closing a connection that sent no AUTH within %d s", AUTH_TIMEOUT_MS / 1000);
            session_end(s);
        }
    }
    if (G.vsock_fd < 0)
        vsock_check();
    if (G.con_state != CON_UP && now >= G.con_retry_at)
        console_check();
}

int serve_main(const struct serve_opts *opts)
{
    G.opts = opts;
    if (pipe2(G.sigpipe, O_CLOEXEC | O_NONBLOCK) < 0) {
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
        G.unix_fd = unix_listen(opts->unix_path);
        if (G.unix_fd < 0)
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

    while (!G.quit) {
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
