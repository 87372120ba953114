/* vzkit-agent serve: what the files of `serve` share (chan.c, exec.c and relay.c do not use it).
 *
 *   wire.c       frames out: the buffer pool, a session's output queue and its flush
 *   session.c    one session: HELLO, AUTH, frame dispatch, input framing, stdin splice
 *   transport.c  where sessions come from: vsock and unix listeners, the virtio console port
 *   serve.c      the state below, signals and children, the poll() loop
 */
#ifndef VZKIT_SERVE_H
#define VZKIT_SERVE_H

#include "agent.h"

#define OUT_LIMIT (1024u * 1024u) /* stop producing for a session above this many queued bytes */
#define CLOSE_GRACE_MS 2000

enum con_state { CON_NONE, CON_IDLE, CON_UP };

/* The state of `serve` (serve.c). Sessions and channels that end are unlinked at once and put
 * on the grave lists, freed at the end of the loop iteration. */
struct serve_state {
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
};

extern struct serve_state g_serve;

/* ---- wire.c ------------------------------------------------------------------------------- */

/* Drop queued frames, except one already partly written (the stream must stay framed). */
void drop_output(struct session *s);
/* Write queued frames until the fd would block; -1 when the peer is gone. */
int flush_output(struct session *s);

/* ---- session.c ---------------------------------------------------------------------------- */

struct session *session_new(enum sess_kind kind, int rfd, int wfd);
/* Kill the session's processes, close its fds (not the console's) and bury it. */
void session_end(struct session *s);
void on_session_readable(struct session *s);

/* ---- transport.c -------------------------------------------------------------------------- */

/* On timer or SIGIO: open the console port, or notice that the host has connected. */
void console_check(void);
/* Read returned 0 on the console: no host is connected right now. */
void console_hangup(void);
/* The console port failed: close it and start over later. */
void console_reopen(void);
/* Listen on the vsock port (retried until it works). */
void vsock_check(void);
int unix_listen(const char *path);
void on_accept(int lfd, bool vsock);

#endif
