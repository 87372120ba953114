/* vzkit-agent: command line and small helpers. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

bool g_verbose;
bool g_test_mode;
unsigned long g_vsock_buffer = VSOCK_BUFFER_DEFAULT;
bool g_splice = true;

static void vlog(const char *fmt, va_list ap)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "vzkit-agent: ");
    vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    size_t len = strlen(buf);
    buf[len++] = '\n';
    (void)write_all(2, buf, len);
}

void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

void debugmsg(const char *fmt, ...)
{
    if (!g_verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

/* In a freshly forked child, before exec: default dispositions and an empty signal mask. */
void reset_child_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig < 65; sig++)
        (void)sigaction(sig, &sa, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Blocking write of everything (used for small messages and regular files). */
int write_all(int fd, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

void vsock_tune(int fd)
{
    if (!g_vsock_buffer)
        return;
    /* The maximum first: the kernel clamps the size to [min, max]. */
    unsigned long long v = g_vsock_buffer;
    if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, &v, sizeof v) < 0 ||
        setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &v, sizeof v) < 0)
        debugmsg("vsock buffer size %llu: %s", v, strerror(errno));
}

/* fds 0-2 always exist, so pipes and sockets never land on them. */
static void ensure_std_fds(void)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) < 0) {
            int nfd = open("/dev/null", O_RDWR);
            if (nfd >= 0 && nfd != fd) {
                dup2(nfd, fd);
                close(nfd);
            }
        }
    }
}

#define STR_(x) #x
#define STR(x) STR_(x)

static const char USAGE[] =
    "usage: vzkit-agent serve [--vsock-port PORT] [--no-vsock] [--port-name NAME]\n"
    "                         [--no-console] [--stdio | --unix PATH] [--vsock-buffer BYTES]\n"
    "                         [--key-file PATH] [--clock-dry-run] [--verbose]\n"
    "       vzkit-agent relay (--listen-vsock PORT | --connect-vsock CID:PORT |\n"
    "                          --listen-unix PATH | --connect-unix PATH) --exec CMD\n"
    "                         [--vsock-buffer BYTES]\n"
    "       vzkit-agent --version\n"
    "\n"
    "serve: answer the vzkit agent protocol on vsock port " STR(AGENT_VSOCK_PORT) " and on the\n"
    "virtio console port " AGENT_PORT_NAME " (--stdio / --unix PATH replace both, for tests on\n"
    "a host).\n"
    "relay: bridge one stream connection at a time to `/bin/sh -c CMD`'s stdin/stdout.\n"
    "--vsock-buffer (default: $VZKIT_AGENT_VSOCK_BUFFER, else 2 MiB): the receive buffer\n"
    "of vsock sockets, SO_VM_SOCKETS_BUFFER_SIZE; 0 keeps the kernel's.\n"
    "--key-file: every vsock (and unix) connection must start with an AUTH frame carrying\n"
    "the key this file holds (re-read each time). vsock peers other than the host (CID 2)\n"
    "are always refused.\n"
    "--clock-dry-run (a test hook; implied by --stdio and --unix): SET_CLOCK reports the\n"
    "step it would make and leaves the clock alone.\n";

int parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v > max)
        return -1;
    *out = v;
    return 0;
}

int set_vsock_buffer(const char *v)
{
    unsigned long n;
    if (parse_uint(v, VSOCK_BUFFER_MAX, &n) < 0) {
        logmsg("bad vsock buffer size %s (bytes, at most %u)", v, VSOCK_BUFFER_MAX);
        return -1;
    }
    g_vsock_buffer = n;
    return 0;
}

static int serve_cmd(int argc, char **argv)
{
    struct serve_opts o = {
        .vsock = true,
        .vsock_port = AGENT_VSOCK_PORT,
        .console = true,
        .port_name = AGENT_PORT_NAME,
    };
    bool explicit_vsock = false, explicit_console = false;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        unsigned long n;
        if (!strcmp(a, "--vsock-port") && v) {
            if (parse_uint(v, 0xffffffffu, &n) < 0) {
                logmsg("bad --vsock-port %s", v);
                return 2;
            }
            o.vsock_port = (unsigned)n;
            explicit_vsock = true;
            i++;
        } else if (!strcmp(a, "--vsock-buffer") && v) {
            if (set_vsock_buffer(v) < 0)
                return 2;
            i++;
        } else if (!strcmp(a, "--no-vsock")) {
            o.vsock = false;
        } else if (!strcmp(a, "--port-name") && v) {
            o.port_name = v;
            explicit_console = true;
            i++;
        } else if (!strcmp(a, "--no-console")) {
            o.console = false;
        } else if (!strcmp(a, "--stdio")) {
            o.stdio = true;
        } else if (!strcmp(a, "--unix") && v) {
            o.unix_path = v;
            i++;
        } else if (!strcmp(a, "--key-file") && v) {
            o.key_file = v;
            i++;
        } else if (!strcmp(a, "--clock-dry-run")) {
            g_clock_dry_run = true;
        } else if (!strcmp(a, "--verbose") || !strcmp(a, "-v")) {
            g_verbose = true;
        } else {
            fputs(USAGE, stderr);
            return 2;
        }
    }
    if (o.stdio && o.unix_path) {
        logmsg("--stdio and --unix are exclusive");
        return 2;
    }
    if (o.stdio || o.unix_path) {
        g_test_mode = true;
        g_clock_dry_run = true; /* never the host's clock from a test */
        o.vsock = o.vsock && explicit_vsock;
        o.console = o.console && explicit_console;
    }
    return serve_main(&o);
}

int main(int argc, char **argv)
{
    ensure_std_fds();
    const char *env = getenv("VZKIT_AGENT_VSOCK_BUFFER");
    if (env && *env && set_vsock_buffer(env) < 0)
        return 2;
    env = getenv("VZKIT_AGENT_SPLICE");
    g_splice = !(env && !strcmp(env, "0"));
    if (argc >= 2 && !strcmp(argv[1], "serve"))
        return serve_cmd(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "relay"))
        return relay_main(argc, argv);
    if (argc == 2 && !strcmp(argv[1], "--version")) {
        printf("vzkit-agent %s (protocol %d.%d)\n", AGENT_VERSION, PROTO_MAJOR, PROTO_MINOR);
        return 0;
    }
    fputs(USAGE, argc == 2 && !strcmp(argv[1], "--help") ? stdout : stderr);
    return argc == 2 && !strcmp(argv[1], "--help") ? 0 : 2;
}
