/*
 * Preloaded into an s6tls program by the kernel TLS tests, to make the
 * kernel's "no" happen on purpose: the setsockopt named by S6TLS_FAIL
 * ("ulp": TCP_ULP, "tx": SOL_TLS/TLS_TX, "rx": SOL_TLS/TLS_RX) fails with
 * ENOMEM; every other call goes through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define SOL_TLS 282
#define TCP_ULP 31

typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

int setsockopt(int fd, int level, int name, const void *value, socklen_t length)
{
    static setsockopt_fn real;
    const char *fail = getenv("S6TLS_FAIL");
    if (!real)
        real = (setsockopt_fn)dlsym(RTLD_NEXT, "setsockopt");
    if (fail && ((level == IPPROTO_TCP && name == TCP_ULP && !strcmp(fail, "ulp"))
                 || (level == SOL_TLS && name == 1 && !strcmp(fail, "tx"))
                 || (level == SOL_TLS && name == 2 && !strcmp(fail, "rx")))) {
        errno = ENOMEM;
        return -1;
    }
    return real(fd, level, name, value, length);
}
