/* port-service PORT: the guest side of bench/ports.py, one connection at a time.
 * The first byte of a connection says what to do: 'h' answers "hi" and closes (connection
 * latency); 'u' reads to EOF and answers the byte count as 8 little-endian bytes (upload);
 * 'd' + 8 little-endian bytes N sends N bytes and closes (download).
 * A connection that fails (reset, client gone) only ends itself.
 * Built static by bench/ports.py: zig cc -target x86_64-linux-musl -static -O2 -s */
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[256 * 1024];

static int read_full(int fd, void *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)p + got, n - got);
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static void serve(int c)
{
    unsigned char cmd;
    if (read_full(c, &cmd, 1) < 0)
        return;
    if (cmd == 'h') {
        (void)!write(c, "hi", 2);
    } else if (cmd == 'u') {
        uint64_t total = 0;
        ssize_t r;
        while ((r = read(c, buf, sizeof buf)) > 0)
            total += (uint64_t)r;
        unsigned char le[8];
        for (int i = 0; i < 8; i++)
            le[i] = (unsigned char)(total >> (8 * i));
        (void)!write(c, le, 8);
    } else if (cmd == 'd') {
        unsigned char le[8];
        if (read_full(c, le, 8) < 0)
            return;
        uint64_t n = 0;
        for (int i = 0; i < 8; i++)
            n |= (uint64_t)le[i] << (8 * i);
        while (n > 0) {
            size_t chunk = n < sizeof buf ? (size_t)n : sizeof buf;
            ssize_t w = write(c, buf, chunk);
            if (w <= 0)
                return;
            n -= (uint64_t)w;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 64) < 0) {
        perror("port-service");
        return 1;
    }
    memset(buf, 'x', sizeof buf);
    signal(SIGPIPE, SIG_IGN); /* a connection that went away must not end the service */
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0)
            continue;
        serve(c);
        close(c);
    }
}
