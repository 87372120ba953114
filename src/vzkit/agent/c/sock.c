/* vzkit-agent: socket channels (CONNECT, protocol 2.3) — a host-published port's connection to
 * a guest service. TCP: one connection per channel, bytes both ways with the channels' flow
 * control and half-close. UDP: one connected socket per channel (per host peer), each
 * SOCK_DATA frame one datagram. Only loopback and the guest's own addresses may be reached
 * (docs/security.md). */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* ---- the guest address ----------------------------------------------------------------------- */

/* Loopback (127/8) or an IPv4 address of one of the guest's interfaces right now. */
static bool guest_own_address(struct in_addr a)
{
    if ((ntohl(a.s_addr) >> 24) == 127)
        return true;
    struct ifaddrs *list, *i;
    if (getifaddrs(&list) < 0)
        return false;
    bool found = false;
    for (i = list; i && !found; i = i->ifa_next)
        if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET)
            found = ((struct sockaddr_in *)(void *)i->ifa_addr)->sin_addr.s_addr == a.s_addr;
    freeifaddrs(list);
    return found;
}

/* ---- CONNECT --------------------------------------------------------------------------------- */

static const char *proto_name(enum chan_kind k) { return k == CH_TCP ? "tcp" : "udp"; }

int sock_connect(struct session *s, uint32_t id, const unsigned char *p, size_t n)
{
    struct reader r = {p, n, false};
    uint32_t proto = rd_u32(&r), port = rd_u32(&r), window = rd_u32(&r);
    if (r.bad || r.n > 64)
        return -1;
    char addr[65] = "127.0.0.1";
    if (r.n) {
        memcpy(addr, r.p, r.n);
        addr[r.n] = 0;
    }
    if (proto != SOCK_TCP && proto != SOCK_UDP) {
        send_error(s, id, EPROTONOSUPPORT, "connect: protocol %u (tcp is 6, udp 17)", proto);
        return 0;
    }
    enum chan_kind kind = proto == SOCK_TCP ? CH_TCP : CH_UDP;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (port == 0 || port > 65535 || memchr(r.p, 0, r.n) ||
        inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        send_error(s, id, EINVAL, "connect %s %s:%u: not an IPv4 address and port 1-65535",
                   proto_name(kind), addr, port);
        return 0;
    }
    if (!guest_own_address(sa.sin_addr)) {
        send_error(s, id, EACCES,
                   "connect %s %s:%u: not an address of this guest (only loopback and the "
                   "guest's own addresses can be published)",
                   proto_name(kind), addr, port);
        return 0;
    }
    int fd = socket(AF_INET, (kind == CH_TCP ? SOCK_STREAM : SOCK_DGRAM) | SOCK_NONBLOCK |
                                 SOCK_CLOEXEC, 0);
    int err = fd < 0 ? errno : 0;
    if (!err && kind == CH_TCP) {
        int one = 1; /* forwarded bytes go out as they come, as the host's sender wrote them */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int rc = err ? -1 : connect(fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc < 0 && !err)
        err = errno;
    bool connecting = err == EINPROGRESS;
    int wfd = err && !connecting ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if ((!err || connecting) && wfd < 0)
        err = errno, connecting = false;
    struct chan *c = err && !connecting ? NULL : chan_new(s, id, kind);
    if (!c && (!err || connecting))
        err = ENOMEM, connecting = false;
    if (!c) {
        send_error(s, id, err, "connect %s %s:%u: %s", proto_name(kind), addr, port,
                   strerror(err));
        if (fd >= 0)
            close(fd);
        if (wfd >= 0)
            close(wfd);
        return 0;
    }
    c->fd[STREAM_OUT] = fd;
    c->in_fd = wfd;
    c->window[STREAM_OUT] = window;
    c->port = (uint16_t)port;
    c->connecting = connecting;
    if (connecting)
        c->deadline_ms = now_ms() + CONNECT_TIMEOUT_MS;
    else
        send_frame(s, T_OK, id, NULL, 0);
    debugmsg("channel %u: %s %s:%u %s", id, proto_name(kind), addr, port,
             connecting ? "connecting" : "connected");
    return 0;
}

/* The channel failed: ERROR with errno, then it is gone (the guest socket closed). */
static void sock_fail(struct chan *c, int err, const char *what)
{
    send_error(c->sess, c->id, err, "%s guest port %d: %s: %s", proto_name(c->kind),
               (int)c->port, what, strerror(err));
    chan_free(c);
}

/* Both ways done (TCP): SOCK_CLOSE ends the channel. */
static void sock_check_done(struct chan *c)
{
    if (c->kind == CH_TCP && c->fd[STREAM_OUT] < 0 && c->in_fd < 0 && !c->in_head) {
        send_frame(c->sess, T_SOCK_CLOSE, c->id, NULL, 0);
        chan_free(c);
    }
}

void sock_on_deadline(struct chan *c)
{
    c->deadline_ms = 0;
    if (c->connecting)
        sock_fail(c, ETIMEDOUT, "connect");
}

/* ---- host -> guest ---------------------------------------------------------------------------- */

static void grant(struct chan *c, bool force)
{
    if (c->in_ungranted == 0 || (!force && c->in_ungranted < IN_WINDOW / 4))
        return;
    send_window(c->sess, c->id, (uint32_t)c->in_ungranted, STREAM_OUT);
    c->in_outstanding -= c->in_ungranted;
    c->in_ungranted = 0;
}

/* The host's EOF once everything before it was written: shut the guest socket's writing. */
static void maybe_shut(struct chan *c)
{
    if (c->in_eof && !c->in_head && !c->connecting && c->in_fd >= 0) {
        shutdown(c->in_fd, SHUT_WR);
        close_fd(&c->in_fd);
        sock_check_done(c);
    }
}

void sock_on_writable(struct chan *c)
{
    if (c->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->in_fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err) {
            sock_fail(c, err, "connect");
            return;
        }
        c->connecting = false;
        c->deadline_ms = 0;
        send_frame(c->sess, T_OK, c->id, NULL, 0);
    }
    while (c->in_head) {
        struct buf *b = c->in_head;
        ssize_t w = send(c->in_fd, b->data + b->off, b->len - b->off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (w < 0) {
            sock_fail(c, errno, "write");
            return;
        }
        b->off += (size_t)w;
        c->in_ungranted += (uint64_t)w;
        if (b->off == b->len) {
            c->in_head = b->next;
            if (!c->in_head)
                c->in_tail = NULL;
            buf_free(b);
        }
    }
    grant(c, false);
    maybe_shut(c);
}

int sock_data(struct chan *c, const unsigned char *p, size_t n)
{
    if (c->in_eof)
        return -1; /* data after the host's SOCK_EOF */
    if (c->in_outstanding + n > IN_WINDOW)
        return -2;
    c->in_outstanding += n;
    if (c->kind == CH_UDP) { /* one datagram; a full socket buffer drops it, as a network would */
        if (send(c->in_fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno != EAGAIN &&
            errno != EWOULDBLOCK && errno != ENOBUFS) {
            c->in_ungranted += n;
            sock_fail(c, errno, "send");
            return 0;
        }
        c->in_ungranted += n;
        grant(c, false);
        return 0;
    }
    struct buf *b = buf_new(n);
    if (!b) {
        sock_fail(c, ENOMEM, "write");
        return 0;
    }
    memcpy(b->data, p, n);
    if (c->in_tail)
        c->in_tail->next = b;
    else
        c->in_head = b;
    c->in_tail = b;
    if (!c->connecting)
        sock_on_writable(c);
    return 0;
}

int sock_eof(struct chan *c)
{
    if (c->kind != CH_TCP || c->in_eof)
        return -1;
    c->in_eof = true;
    maybe_shut(c);
    return 0;
}

/* ---- guest -> host ---------------------------------------------------------------------------- */

#define READ_BATCH 4
static unsigned char g_dgram[DATA_FRAME_PAYLOAD];

static void udp_readable(struct chan *c)
{
    for (int i = 0; i < READ_BATCH && c->window[STREAM_OUT] >= DATA_FRAME_PAYLOAD; i++) {
        ssize_t n = recv(c->fd[STREAM_OUT], g_dgram, sizeof g_dgram, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n < 0) { /* ECONNREFUSED: nothing listens on the guest port (ICMP unreachable) */
            sock_fail(c, errno, "receive");
            return;
        }
        send_frame(c->sess, T_SOCK_DATA, c->id, g_dgram, (size_t)n);
        c->window[STREAM_OUT] -= (uint64_t)n;
    }
}

void sock_on_readable(struct chan *c)
{
    if (c->kind == CH_UDP) {
        udp_readable(c);
        return;
    }
    struct session *s = c->sess;
    for (int i = 0; i < READ_BATCH; i++) {
        uint64_t want = c->window[STREAM_OUT];
        if (want > DATA_FRAME_PAYLOAD)
            want = DATA_FRAME_PAYLOAD;
        if (want == 0 || (i > 0 && s->out_bytes >= session_out_limit()))
            return;
        ssize_t n = send_from_fd(s, T_SOCK_DATA, c->id, c->fd[STREAM_OUT], (size_t)want);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (n < 0) {
            sock_fail(c, errno, "read");
            return;
        }
        if (n == 0) { /* the guest side shut its writing: pass the half-close on */
            send_frame(s, T_SOCK_EOF, c->id, NULL, 0);
            c->eof_sent = true;
            close_fd(&c->fd[STREAM_OUT]);
            sock_check_done(c);
            return;
        }
        c->window[STREAM_OUT] -= (uint64_t)n;
        if ((uint64_t)n < want)
            return;
    }
}

/* Poll for reading: TCP while there is credit; UDP only with room for any datagram (a read
 * takes a whole datagram, and one larger than the credit would be cut). */
bool sock_wants_read(const struct chan *c)
{
    if (c->connecting || c->fd[STREAM_OUT] < 0)
        return false;
    return c->window[STREAM_OUT] >= (c->kind == CH_UDP ? DATA_FRAME_PAYLOAD : 1u);
}
