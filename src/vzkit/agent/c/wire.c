/* vzkit-agent serve: frames on the wire. Out: a pool of frame-sized buffers, a session's
 * output queue and its flush, several frames per system call. In: the payload reader the
 * message handlers (chan.c, exec.c) parse with. */
#include "serve.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

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
void drop_output(struct session *s)
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

int flush_output(struct session *s)
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

/* ---- payload parsing (struct reader: agent.h) ---------------------------------------------- */

uint32_t rd_u32(struct reader *r)
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
char *rd_str(struct reader *r, bool *nul)
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
