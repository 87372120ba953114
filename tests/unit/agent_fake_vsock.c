/* A test-only shim linked into a copy of vzkit-agent (never into the guest's binary) with
 * -Wl,--wrap=socket,--wrap=bind,--wrap=accept4: the agent's AF_VSOCK listener becomes a unix
 * socket at $FAKE_VSOCK_PATH, and every connection accepted on it reports the peer address
 * CID $FAKE_VSOCK_PEER_CID, port 4321. So the agent's own accept path and peer check run on a
 * host without vsock, against any CID a test names. */
#include <linux/vm_sockets.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

int __real_socket(int domain, int type, int protocol);
int __real_bind(int fd, const struct sockaddr *addr, socklen_t len);
int __real_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);

static int fake_listener = -1;

int __wrap_socket(int domain, int type, int protocol)
{
    if (domain == AF_VSOCK)
        return __real_socket(AF_UNIX, type, 0);
    return __real_socket(domain, type, protocol);
}

int __wrap_bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    if (addr->sa_family != AF_VSOCK)
        return __real_bind(fd, addr, len);
    struct sockaddr_un un;
    memset(&un, 0, sizeof un);
    un.sun_family = AF_UNIX;
    strncpy(un.sun_path, getenv("FAKE_VSOCK_PATH"), sizeof un.sun_path - 1);
    fake_listener = fd;
    return __real_bind(fd, (struct sockaddr *)&un, sizeof un);
}

int __wrap_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    socklen_t room = len ? *len : 0; /* the kernel sets *len to the unix peer's length */
    int conn = __real_accept4(fd, addr, len, flags);
    if (conn >= 0 && fd == fake_listener && addr && len) {
        struct sockaddr_vm vm;
        memset(&vm, 0, sizeof vm);
        vm.svm_family = AF_VSOCK;
        vm.svm_cid = (unsigned)strtoul(getenv("FAKE_VSOCK_PEER_CID"), NULL, 10);
        vm.svm_port = 4321;
        memcpy(addr, &vm, room < sizeof vm ? room : sizeof vm);
        *len = sizeof vm;
    }
    return conn;
}
