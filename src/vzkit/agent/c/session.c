/* vzkit-agent serve: one session. HELLO and AUTH, the dispatch of a frame to its handler
 * (channels in chan.c and exec.c), input framing with resync on the console, and stdin spliced
 * from a socket into a child's pipe. */
#include "serve.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- sessions ---------------------------------------------------------------------------- */

struct session *session_new(enum sess_kind kind, int rfd, int wfd)
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
    s->next = g_serve.sessions;
    g_serve.sessions = s;
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
    s->draining = false;
    s->drained = 0;
    s->poweroff = false;
}

#define DRAIN_LIMIT (4u * 1024u * 1024u)

void session_end(struct session *s)
{
    if (s->dead)
        return;
    debugmsg("session %p ended", (void *)s);
    session_reset(s);
    s->dead = true;
    for (struct session **pp = &g_serve.sessions; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    if (s->kind == SESS_CONSOLE) {
        g_serve.con_sess = NULL; /* the port stays open: console_check starts the next session */
        if (g_serve.con_state == CON_UP) {
            g_serve.con_state = CON_IDLE;
            g_serve.con_retry_at = now_ms();
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
        g_serve.quit = true;
    s->next = g_serve.grave_sessions;
    g_serve.grave_sessions = s;
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

/* ---- authentication ----------------------------------------------------------------------- */

/* Whether `p` is the key in opts->key_file. The file is read at every AUTH: after a snapshot
 * restore the host serves a new key there (QEMU's fw_cfg is not part of the saved state), so
 * the old one stops working at once. Compared in constant time; an unreadable or empty file
 * matches nothing. */
static bool auth_key_matches(const unsigned char *p, size_t n)
{
    unsigned char key[AUTH_KEY_MAX + 1];
    int fd = open(g_serve.opts->key_file, O_RDONLY | O_CLOEXEC);
    ssize_t len = -1;
    if (fd >= 0) {
        do
            len = read(fd, key, sizeof key);
        while (len < 0 && errno == EINTR);
        close(fd);
    }
    if (len <= 0 || len > AUTH_KEY_MAX) {
        logmsg("no usable key in %s (%s): refusing the connection", g_serve.opts->key_file,
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
    case T_CONNECT:
    case T_SET_CLOCK:
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
    case T_CONNECT:
        rc = sock_connect(s, id, p, n);
        break;
    case T_SET_CLOCK:
        rc = clock_set(s, id, p, n);
        break;
    case T_SOCK_DATA:
    case T_SOCK_EOF:
        c = chan_find(s, id);
        if (!c)
            return; /* the channel ended while this was in flight */
        if (c->kind != CH_TCP && c->kind != CH_UDP)
            rc = -1;
        else
            rc = type == T_SOCK_EOF ? sock_eof(c) : sock_data(c, p, n);
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
    case T_RESIZE:
        if (n != 8 || get_u32(p) > TTY_SIZE_MAX || get_u32(p + 4) > TTY_SIZE_MAX) {
            session_fatal(s, EPROTO, "malformed RESIZE (%zu bytes)", n);
            return;
        }
        c = chan_find(s, id);
        if (c)
            chan_resize(c, get_u32(p), get_u32(p + 4));
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

void on_session_readable(struct session *s)
{
    if (s->draining) { /* lingering close: until the peer's EOF, DRAIN_LIMIT or close_by_ms */
        ssize_t d = recv(s->rfd, s->in, HDR_SIZE + MAX_PAYLOAD, MSG_DONTWAIT);
        if (d < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (d > 0 && (s->drained += (size_t)d) < DRAIN_LIMIT)
            return;
        session_end(s);
        return;
    }
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
