/*
 * vsock-echo: a tiny AF_VSOCK test tool for vzkit's end-to-end tests (guest side).
 *
 *   vsock-echo serve PORT          listen; echo every connection back (one child each);
 *                                  on EOF from the peer, half-close after echoing all
 *   vsock-echo recv PORT           accept one connection, copy it to stdout until EOF
 *   vsock-echo send PORT           accept one connection, copy stdin to it, half-close,
 *                                  then wait for the peer's EOF
 *   vsock-echo connect CID PORT    connect; stdin -> socket (half-close at EOF),
 *                                  socket -> stdout; exit 111 if refused
 *   vsock-echo gen SEED BYTES      write BYTES deterministic pseudo-random bytes
 *   vsock-echo refuse CID PORT     connect and report: "refused" / "connected"
 *
 * VSOCK_ECHO_BUF=BYTES in the environment sets the sockets' buffer size (the window the
 * peer may fill; Linux's default is 256 KiB).
 *
 * Built static for the test guest with:  python -m ziglang cc -target x86_64-linux-musl
 *   -static -O2 -o vsock-echo vsock_echo.c
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF (64 * 1024)

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int vsock_socket(void) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    const char *env = getenv("VSOCK_ECHO_BUF");
    if (env) {
        unsigned long long size = strtoull(env, NULL, 10);
        setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, &size, sizeof size);
        setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &size, sizeof size);
    }
    return fd;
}

static int listen_on(unsigned port) {
    struct sockaddr_vm addr;
    int fd = vsock_socket();
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(fd, 128) < 0)
        die("listen");
    return fd;
}

static int accept_one(int lfd) {
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd >= 0)
            return fd;
        if (errno != EINTR)
            die("accept");
    }
}

/* Copy in -> out until EOF; returns bytes copied or -1. */
static long long pump(int in, int out) {
    static char buf[BUF];
    long long total = 0;
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return total;
        if (write_all(out, buf, (size_t)n) < 0)
            return -1;
        total += n;
    }
}

static int cmd_serve(unsigned port) {
    int lfd = listen_on(port);
    signal(SIGCHLD, SIG_IGN);
    printf("serving %u\n", port);
    fflush(stdout);
    for (;;) {
        int fd = accept_one(lfd);
        pid_t pid = fork();
        if (pid == 0) {
            close(lfd);
            if (pump(fd, fd) < 0)
                _exit(1);
            shutdown(fd, SHUT_WR);
            char c;
            while (read(fd, &c, 1) > 0) {
            }
            _exit(0);
        }
        close(fd);
    }
}

static int cmd_recv(unsigned port) {
    int lfd = listen_on(port);
    int fd = accept_one(lfd);
    long long n = pump(fd, 1);
    close(fd);
    return n < 0 ? 1 : 0;
}

static int cmd_send(unsigned port) {
    int lfd = listen_on(port);
    int fd = accept_one(lfd);
    if (pump(0, fd) < 0)
        return 1;
    shutdown(fd, SHUT_WR);
    char c;
    while (read(fd, &c, 1) > 0) {
    }
    close(fd);
    return 0;
}

static int connect_to(unsigned cid, unsigned port) {
    struct sockaddr_vm addr;
    int fd = vsock_socket();
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = cid;
    addr.svm_port = port;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cmd_connect(unsigned cid, unsigned port) {
    static char buf[BUF];
    int fd = connect_to(cid, port);
    if (fd < 0) {
        perror("connect");
        return 111;
    }
    struct pollfd p[2] = {{0, POLLIN, 0}, {fd, POLLIN, 0}};
    int in_open = 1, sock_open = 1;
    while (sock_open) {
        p[0].fd = in_open ? 0 : -1;
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (in_open && (p[0].revents & (POLLIN | POLLHUP))) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n <= 0) {
                in_open = 0;
                shutdown(fd, SHUT_WR);
            } else if (write_all(fd, buf, (size_t)n) < 0) {
                die("write");
            }
        }
        if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n <= 0)
                sock_open = 0;
            else if (write_all(1, buf, (size_t)n) < 0)
                die("write");
        }
    }
    close(fd);
    return 0;
}

static int cmd_gen(unsigned long long seed, unsigned long long count) {
    static uint64_t buf[BUF / 8];
    uint64_t x = seed ? seed : 0x9E3779B97F4A7C15ULL;
    while (count > 0) {
        for (size_t i = 0; i < BUF / 8; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[i] = x;
        }
        size_t n = count < BUF ? (size_t)count : BUF;
        if (write_all(1, (const char *)buf, n) < 0)
            return 1;
        count -= n;
    }
    return 0;
}

static int cmd_refuse(unsigned cid, unsigned port) {
    int fd = connect_to(cid, port);
    if (fd < 0) {
        printf("%s\n", errno == ECONNRESET || errno == ECONNREFUSED ? "refused" : strerror(errno));
        return 0;
    }
    printf("connected\n");
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "serve"))
        return cmd_serve((unsigned)strtoul(argv[2], NULL, 10));
    if (argc == 3 && !strcmp(argv[1], "recv"))
        return cmd_recv((unsigned)strtoul(argv[2], NULL, 10));
    if (argc == 3 && !strcmp(argv[1], "send"))
        return cmd_send((unsigned)strtoul(argv[2], NULL, 10));
    if (argc == 4 && !strcmp(argv[1], "connect"))
        return cmd_connect((unsigned)strtoul(argv[2], NULL, 10),
                           (unsigned)strtoul(argv[3], NULL, 10));
    if (argc == 4 && !strcmp(argv[1], "gen"))
        return cmd_gen(strtoull(argv[2], NULL, 10), strtoull(argv[3], NULL, 10));
    if (argc == 4 && !strcmp(argv[1], "refuse"))
        return cmd_refuse((unsigned)strtoul(argv[2], NULL, 10),
                          (unsigned)strtoul(argv[3], NULL, 10));
    fprintf(stderr, "usage: vsock-echo serve|recv|send PORT | connect|refuse CID PORT | "
                    "gen SEED BYTES\n");
    return 2;
}
