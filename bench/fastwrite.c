/* The floor's writer in C (see bench/floor.py, `bursts`): the same burst of writes as the
   Python loop, with no interpreter between two system calls, so that the two can be told
   apart: what is left is the kernel's.

   fw_write_each writes the `len` bytes at `buf` to each of the `n` descriptors in `fds`, in
   order, and stores in done_ns[i] the CLOCK_MONOTONIC time (ns) at which write i returned:
   the earliest the i-th client can have the frame. Returns how many writes took the whole
   frame. Called through ctypes, which releases the GIL, so two threads can each write a
   part of one burst at once.

   Build: cc -O2 -shared -fPIC -o fastwrite.so fastwrite.c */

#include <stdint.h>
#include <time.h>
#include <unistd.h>

long fw_write_each(const int *fds, long n, const char *buf, long len, int64_t *done_ns) {
    struct timespec now;
    long whole = 0;
    for (long i = 0; i < n; i++) {
        if (write(fds[i], buf, (size_t)len) == len)
            whole++;
        clock_gettime(CLOCK_MONOTONIC, &now);
        done_ns[i] = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    }
    return whole;
}
