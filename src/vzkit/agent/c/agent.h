/* vzkit-agent: the guest agent of vzkit. Shared declarations.
 *
 * The wire protocol is documented in docs/agent-protocol.md; the constants below must match
 * it and src/vzkit/agent/_protocol.py (tests/unit/test_agent_header.py compares them).
 *
 * Files: main.c (command line, helpers), wire.c (frames out, payload parsing), session.c (a
 * session: HELLO, AUTH, dispatch), transport.c (vsock, unix, the virtio console port), serve.c
 * (the poll loop; serve.h is what these four share), chan.c (channels, data, files), exec.c
 * (exec'd processes), user.c (who they run as), sock.c (socket channels: CONNECT), clock.c
 * (SET_CLOCK), relay.c (the relay command).
 */
#ifndef VZKIT_AGENT_H
#define VZKIT_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define AGENT_VERSION "0.1.0"
#define AGENT_VSOCK_PORT 1024               /* serve's default vsock port */
#define AGENT_PORT_NAME "org.vzkit.agent.0" /* serve's default virtio console port */

/* ---- protocol ---------------------------------------------------------------------------- */

#define PROTO_MAGIC "VZKAGENT"
#define PROTO_MAGIC_LEN 8
#define PROTO_MAJOR 2
#define PROTO_MINOR 3 /* 2.1: EXEC's user; 2.2: EXEC on a pty, RESIZE; 2.3: CONNECT, SET_CLOCK */
#define PROTO_NONCE_LEN 16 /* echoed in the HELLO reply so the host can find it in a stream */
#define HDR_SIZE 12              /* u32 payload length, u8 type, 3 reserved bytes, u32 channel */
#define MAX_PAYLOAD 65536u
#define DATA_FRAME_PAYLOAD (MAX_PAYLOAD - HDR_SIZE) /* data frames the agent sends: 64 KiB */
#define IN_WINDOW (1024u * 1024u) /* host -> agent credit per channel (stdin, file data) */
#define AUTH_KEY_MAX 64           /* bytes of the per-boot key (vzkit's host sends 32) */
#define AUTH_TIMEOUT_MS 10000     /* a connection that must authenticate has this long */

enum msg_type {
    T_RESET = 0x00, /* all-zero header: end the session silently, wait for HELLO */
    T_HELLO = 0x01,
    T_ERROR = 0x02,
    T_PING = 0x03,
    T_PONG = 0x04,
    T_WINDOW = 0x05,
    T_CANCEL = 0x06,
    T_OK = 0x07,
    T_AUTH = 0x08, /* the per-boot key: the first frame of a connection that needs one */
    T_EXEC = 0x10,
    T_STDIN = 0x11,
    T_STDIN_EOF = 0x12,
    T_STDOUT = 0x13,
    T_STDERR = 0x14,
    T_EXIT = 0x15,
    T_KILL = 0x16,
    T_RESIZE = 0x17, /* 2.2: a tty channel's window size */
    T_READ_FILE = 0x20,
    T_WRITE_FILE = 0x21,
    T_FILE_DATA = 0x22,
    T_FILE_END = 0x23,
    T_SYNC = 0x30,
    T_POWEROFF = 0x31,
    T_SET_CLOCK = 0x32, /* 2.3: the host's CLOCK_REALTIME; the agent steps the guest's */
    T_CLOCK = 0x33,     /* 2.3: SET_CLOCK's answer: the step made */
    T_CONNECT = 0x40,   /* 2.3: a channel that is a TCP connection or UDP socket in the guest */
    T_SOCK_DATA = 0x41, /* 2.3: bytes (TCP) or one datagram (UDP), either way */
    T_SOCK_EOF = 0x42,  /* 2.3: no more data this way (TCP half-close) */
    T_SOCK_CLOSE = 0x43, /* 2.3: a socket channel is over (both ways done) */
};

enum { EXEC_STDIN = 1, EXEC_ENV_REPLACE = 2, EXEC_MERGE_STDERR = 4, EXEC_TTY = 8 };
#define TTY_SIZE_MAX 65535 /* rows and columns of a pty (struct winsize has shorts) */
enum { EXIT_TIMED_OUT = 1, EXIT_CORE_DUMPED = 2 };
enum { KILL_GROUP = 1 };
enum { STREAM_OUT = 0, STREAM_ERR = 1 };
enum { SOCK_TCP = 6, SOCK_UDP = 17 }; /* CONNECT's protocol: the IPPROTO_ numbers */
enum { CLOCK_DRY_RUN = 1 };          /* CLOCK flag: not applied (the test hook, see clock.c) */
#define CONNECT_TIMEOUT_MS 10000     /* a CONNECT not connected by then fails with ETIMEDOUT */
#define CLOCK_THRESHOLD_MS 500       /* SET_CLOCK's default: smaller differences are kept */

/* ---- objects ----------------------------------------------------------------------------- */

/* A queued chunk of bytes: a frame going out to a session, or stdin waiting for a child. */
struct buf {
    struct buf *next;
    size_t len, off;
    bool pooled; /* see buf_new */
    unsigned char data[];
};

/* A buffer of `len` bytes. Frame-sized ones (16 KiB up to a frame) come from a small pool
 * (wire.c): malloc gives big blocks back to the kernel when they are freed, and every frame
 * then paid page faults and zeroed pages to get one again. */
struct buf *buf_new(size_t len);
void buf_free(struct buf *b);

enum chan_kind { CH_EXEC, CH_READ, CH_WRITE, CH_TCP, CH_UDP };

struct session;

struct chan {
    struct chan *next;
    struct session *sess;
    uint32_t id;
    enum chan_kind kind;
    bool dead;
    /* exec: the child and its pipes; read: fd[STREAM_OUT] is the file */
    pid_t pid;       /* 0 once reaped */
    pid_t exit_pgid; /* the process group, after the leader was reaped */
    int status;
    bool timed_out;
    int64_t deadline_ms; /* 0: none */
    int fd[2];           /* stdout, stderr (read ends), -1 at EOF */
    uint64_t window[2];  /* credit granted by the host, per stream */
    uint64_t total;      /* bytes of file data sent (read) */
    int in_fd;           /* child's stdin (write end), -1 once closed */
    int pty_fd;          /* tty channels: the pty master (fd[0] and in_fd are dups of it) */
    struct buf *in_head, *in_tail;
    bool in_eof;            /* the host sent STDIN_EOF */
    uint64_t in_outstanding; /* host -> agent bytes received and not yet granted back */
    uint64_t in_ungranted;   /* consumed bytes not yet granted back */
    /* tcp, udp (sock.c): fd[STREAM_OUT] reads the socket, in_fd (a dup) writes it */
    bool connecting; /* tcp: connect() in progress (in_fd polled for POLLOUT) */
    bool eof_sent;   /* tcp: SOCK_EOF sent (the guest side shut its writing) */
    uint16_t port;   /* the guest port (for messages) */
    /* write */
    int wfd;
    char *tmp_path, *path;
};

enum sess_kind { SESS_SOCKET, SESS_STDIO, SESS_CONSOLE };

struct session {
    struct session *next;
    enum sess_kind kind;
    int rfd, wfd;
    bool dead;
    bool hello;         /* HELLO exchanged */
    bool need_auth;     /* an AUTH frame with the key must come first (socket sessions) */
    bool authed;        /* the first frame was a good AUTH (or none was needed) */
    int64_t auth_by_ms; /* need_auth: the connection ends if no good AUTH came by then */
    bool resync;        /* skip bytes up to a HELLO (after RESET; always on the console) */
    bool closing;       /* fatal error sent: flush the queue, then end */
    bool draining;      /* closing, flushed, write side shut: discard input until EOF */
    size_t drained;     /* bytes discarded while draining (at most DRAIN_LIMIT) */
    bool poweroff;      /* POWEROFF acknowledged: flush, then power off */
    int64_t close_by_ms;
    size_t skipped;     /* bytes skipped while resyncing (for the log) */
    unsigned char *in;  /* HDR_SIZE + MAX_PAYLOAD bytes */
    size_t in_len;
    struct buf *out_head, *out_tail;
    size_t out_bytes;
    struct chan *chans;
};

/* ---- globals and helpers (main.c) -------------------------------------------------------- */

extern bool g_verbose;
extern bool g_test_mode; /* --stdio / --unix: POWEROFF exits the agent instead */
/* Receive buffer of every vsock socket (SO_VM_SOCKETS_BUFFER_SIZE; 0: the kernel's 256 KiB).
 * Set by VZKIT_AGENT_VSOCK_BUFFER or --vsock-buffer; see docs/vsock.md (performance). */
#define VSOCK_BUFFER_DEFAULT (2u * 1024u * 1024u)
#define VSOCK_BUFFER_MAX (64u * 1024u * 1024u)
extern unsigned long g_vsock_buffer;
/* Socket stdin goes into children's pipes with splice(2) (session.c); VZKIT_AGENT_SPLICE=0 turns
 * it off, so bench/vsock.py can compare the two in one guest. */
extern bool g_splice;
/* SET_CLOCK only reports the step it would make (clock.c): set by --clock-dry-run, and always
 * in --stdio/--unix test mode, so a test on a host never sets the host's clock. */
extern bool g_clock_dry_run;

void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void debugmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int64_t now_ms(void);
int set_nonblock(int fd);
void put_u32(unsigned char *p, uint32_t v);
uint32_t get_u32(const unsigned char *p);
void put_u64(unsigned char *p, uint64_t v);
void reset_child_signals(void);
int write_all(int fd, const void *buf, size_t len);
int parse_uint(const char *s, unsigned long max, unsigned long *out);
/* Apply g_vsock_buffer to a vsock socket (a listener's accepted sockets inherit it). */
void vsock_tune(int fd);
/* Parse and set g_vsock_buffer; logs and returns -1 when invalid. */
int set_vsock_buffer(const char *v);

/* ---- serve.c, wire.c ----------------------------------------------------------------------- */

struct serve_opts {
    bool vsock;
    unsigned vsock_port;
    bool console;
    const char *port_name;
    bool stdio;
    const char *unix_path;
    /* The per-boot key, read at every AUTH (a restored guest's host serves a new one); NULL:
     * connections need no key. Either way vsock peers must be the host (CID 2). */
    const char *key_file;
};

int serve_main(const struct serve_opts *opts);
int send_frame(struct session *s, uint8_t type, uint32_t id, const void *p, size_t n);
int send_frame2(struct session *s, uint8_t type, uint32_t id, const void *p1, size_t n1,
                const void *p2, size_t n2);
int send_error(struct session *s, uint32_t id, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int send_window(struct session *s, uint32_t id, uint32_t inc, uint32_t stream);
/* Append a frame of `n` payload bytes read from `fd`; returns bytes read, 0 at EOF, -1. */
ssize_t send_from_fd(struct session *s, uint8_t type, uint32_t id, int fd, size_t max);
size_t session_out_limit(void);
void chan_bury(struct chan *c); /* freed at the end of the loop iteration */

/* A message payload being parsed: a read past the end sets `bad` and yields 0 / NULL. */
struct reader {
    const unsigned char *p;
    size_t n;
    bool bad;
};
uint32_t rd_u32(struct reader *r);
/* A u32-length-prefixed string, copied and NUL-terminated; *nul is set if it contains NUL. */
char *rd_str(struct reader *r, bool *nul);

/* ---- chan.c, exec.c ----------------------------------------------------------------------- */

struct chan *chan_new(struct session *s, uint32_t id, enum chan_kind kind);

/* Each returns 0, -1 for a malformed message or -2 for a window overrun (session-fatal). */
int chan_exec(struct session *s, uint32_t id, const unsigned char *p, size_t n);
int chan_read_file(struct session *s, uint32_t id, const unsigned char *p, size_t n);
int chan_write_file(struct session *s, uint32_t id, const unsigned char *p, size_t n);
int chan_data(struct session *s, struct chan *c, uint8_t type, const unsigned char *p, size_t n);
int chan_stdin_eof(struct session *s, struct chan *c);
bool chan_stdin_direct(const struct chan *c, size_t n);
void chan_stdin_spliced(struct chan *c, size_t n);
void chan_kill(struct chan *c, int sig, bool group);
/* RESIZE: the window size of a tty channel's pty (ignored on other channels). */
void chan_resize(struct chan *c, uint32_t rows, uint32_t cols);
void chan_cancel(struct chan *c);
struct chan *chan_find(struct session *s, uint32_t id);
void chan_free(struct chan *c);
/* Event handlers, called from the loop. */
void chan_on_readable(struct chan *c, int stream);
void chan_on_stdin_writable(struct chan *c);
void chan_on_reaped(struct chan *c, int status);
void chan_check_done(struct chan *c);
void chan_on_deadline(struct chan *c, int64_t now);

/* ---- sock.c, clock.c ----------------------------------------------------------------------- */

/* CONNECT: 0, or -1 for a malformed message (session-fatal). */
int sock_connect(struct session *s, uint32_t id, const unsigned char *p, size_t n);
/* SOCK_DATA / SOCK_EOF from the host: 0, -1 malformed, -2 a window overrun. */
int sock_data(struct chan *c, const unsigned char *p, size_t n);
int sock_eof(struct chan *c);
void sock_on_readable(struct chan *c);
void sock_on_writable(struct chan *c);
void sock_on_deadline(struct chan *c);
bool sock_wants_read(const struct chan *c);
/* SET_CLOCK: 0, or -1 for a malformed message. */
int clock_set(struct session *s, uint32_t id, const unsigned char *p, size_t n);

/* ---- user.c ------------------------------------------------------------------------------- */

/* Who an exec'd process runs as: EXEC's "USER[:GROUP]", resolved in the agent. */
#define USER_ENV_N 3
struct exec_user {
    bool set; /* false: the agent's own user (root) */
    uid_t uid;
    gid_t gid;
    gid_t *groups; /* the supplementary groups setgroups gets */
    size_t ngroups;
    char *env[USER_ENV_N]; /* HOME, USER, LOGNAME ("K=V") from the passwd entry */
};

/* Resolve `spec`: 0, or -1 with an errno in *errnum and what went wrong in msg[n]. */
int user_resolve(const char *spec, struct exec_user *u, int *errnum, char *msg, size_t n);
void user_free(struct exec_user *u);
/* In the child: setgroups, setgid, setuid; -1 (reason on stderr) when one fails. */
int user_apply(const struct exec_user *u);

/* ---- relay.c ------------------------------------------------------------------------------ */

int relay_main(int argc, char **argv);

#endif
