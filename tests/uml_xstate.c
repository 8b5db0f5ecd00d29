/*
 * Preloaded into Debian 12's User-Mode-Linux kernel (6.1) by tests/guest.py.
 *
 * UML saves and restores its processes' FPU state with
 * PTRACE_GETREGSET/SETREGSET(NT_X86_XSTATE) in a buffer sized for AVX.  A
 * host kernel whose CPU has AVX-512 or AMX accepts a SETREGSET only with
 * its whole XSAVE area and fails the short one with EFAULT, which kills the
 * guest's first process.  Here a short SETREGSET becomes a whole one: the
 * part UML gave, over the rest of the state the process already has.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef long (*ptrace_fn)(enum __ptrace_request, pid_t, void *, void *);

long ptrace(enum __ptrace_request req, ...)
{
    static ptrace_fn real;
    static __thread unsigned char whole[65536] __attribute__((aligned(64)));
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if (req == PTRACE_SETREGSET && (long)addr == NT_X86_XSTATE) {
        struct iovec *given = data;
        struct iovec all = {whole, sizeof whole};
        if (real(PTRACE_GETREGSET, pid, addr, &all) < 0)
            return -1;
        if (given->iov_len < all.iov_len) {
            memcpy(whole, given->iov_base, given->iov_len);
            return real(PTRACE_SETREGSET, pid, addr, &all);
        }
    }
    return real(req, pid, addr, data);
}
