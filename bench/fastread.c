/* The load generator's native frame reader (see bench/loadgen.py, `NativeReader`).

   One call, fr_poll, does one poll round of `Poller`: epoll_wait(epfd, 0), one recvmsg per
   ready descriptor with its SO_TIMESTAMPNS receive time, then parses every complete RFC 6455
   server frame of that descriptor. Notify frames (text payload starting {"type":"notify")
   are counted per descriptor and in total and, while the window is active, their latencies
   (kernel receipt - "t", now - "t") go into two log-bucketed histograms with the bucket
   function of bench/control.py Histogram.add. Everything else - another text frame, ping,
   close, a protocol error, end of stream, a read error - is appended to an events buffer
   for Python: records of (int32 fd, int32 kind, uint32 length, payload). A descriptor that
   had a terminal event is not read again until Python removes it (fr_remove) and adds it
   anew. Called through ctypes, which releases the GIL. Python owns sockets and epoll set.

   Build: cc -O2 -shared -fPIC -o fastread.so fastread.c -lm */

#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#define FR_SO_TIMESTAMPNS 35
#define READ_SIZE (1 << 16)

enum { EV_PROTOCOL = -1, EV_EOF = -2, EV_ERROR = -3, EV_TOO_LARGE = -4 };

typedef struct {
    uint8_t *buf;   /* the incomplete tail of the stream (a partial frame) */
    size_t len, cap;
    int64_t notified;
    int known;      /* added and not removed */
    int dead;       /* a terminal event was reported */
} fdstate;

typedef struct {
    int64_t *buckets;
    int64_t count;
    double total, max;
} hist;

typedef struct {
    double floor, per_e;
    int nbuckets;
    size_t max_frame;   /* the per-descriptor buffer cap */
    fdstate *fds;
    int nfds;           /* size of fds */
    int known;          /* descriptors added */
    struct epoll_event *ready;
    int nready;         /* size of ready */
    uint8_t *scratch;
    uint8_t *events;
    size_t events_len, events_cap;
    int64_t frames;     /* notify frames counted while the window was active */
    hist lat, app;
} ctx;

static double now_real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void hist_add(ctx *c, hist *h, double seconds) {
    h->count++;
    h->total += seconds;
    if (seconds > h->max) h->max = seconds;
    long index = 0;
    if (seconds > c->floor) {
        double x = log(seconds / c->floor) * c->per_e;
        index = x < (double)(c->nbuckets - 1) ? (long)x : c->nbuckets - 1;
    }
    h->buckets[index]++;
}

static void hist_reset(ctx *c, hist *h) {
    memset(h->buckets, 0, sizeof(int64_t) * (size_t)c->nbuckets);
    h->count = 0;
    h->total = 0.0;
    h->max = 0.0;
}

void fr_free(ctx *c);

ctx *fr_new(double floor, double per_e, int nbuckets, int64_t max_frame) {
    ctx *c = calloc(1, sizeof(ctx));
    if (!c) return NULL;
    c->floor = floor;
    c->per_e = per_e;
    c->nbuckets = nbuckets < 1 ? 1 : nbuckets;
    c->max_frame = (size_t)max_frame;
    c->lat.buckets = calloc((size_t)c->nbuckets, sizeof(int64_t));
    c->app.buckets = calloc((size_t)c->nbuckets, sizeof(int64_t));
    c->scratch = malloc(READ_SIZE);
    if (!c->lat.buckets || !c->app.buckets || !c->scratch) {
        fr_free(c);
        return NULL;
    }
    return c;
}

void fr_free(ctx *c) {
    if (!c) return;
    for (int fd = 0; fd < c->nfds; fd++) free(c->fds[fd].buf);
    free(c->fds);
    free(c->ready);
    free(c->scratch);
    free(c->events);
    free(c->lat.buckets);
    free(c->app.buckets);
    free(c);
}

/* Start reading `fd` afresh (fds get reused). 0, or -1 when out of memory. */
int fr_add(ctx *c, int fd) {
    if (fd < 0) return -1;
    if (fd >= c->nfds) {
        int n = c->nfds ? c->nfds : 64;
        while (n <= fd) n *= 2;
        fdstate *fds = realloc(c->fds, sizeof(fdstate) * (size_t)n);
        if (!fds) return -1;
        memset(fds + c->nfds, 0, sizeof(fdstate) * (size_t)(n - c->nfds));
        c->fds = fds;
        c->nfds = n;
    }
    fdstate *s = &c->fds[fd];
    if (!s->known) c->known++;
    free(s->buf);
    memset(s, 0, sizeof(*s));
    s->known = 1;
    if (c->known > c->nready) {
        int n = c->nready ? c->nready : 64;
        while (n < c->known) n *= 2;
        struct epoll_event *ready = realloc(c->ready, sizeof(struct epoll_event) * (size_t)n);
        if (!ready) return -1;
        c->ready = ready;
        c->nready = n;
    }
    return 0;
}

/* Forget `fd`; answers its notify count. */
int64_t fr_remove(ctx *c, int fd) {
    if (fd < 0 || fd >= c->nfds || !c->fds[fd].known) return 0;
    fdstate *s = &c->fds[fd];
    int64_t notified = s->notified;
    free(s->buf);
    memset(s, 0, sizeof(*s));
    c->known--;
    return notified;
}

int64_t fr_notified(ctx *c, int fd) {
    if (fd < 0 || fd >= c->nfds || !c->fds[fd].known) return 0;
    return c->fds[fd].notified;
}

static int event(ctx *c, int fd, int kind, const uint8_t *payload, size_t length) {
    size_t need = c->events_len + 12 + length;
    if (need > c->events_cap) {
        size_t cap = c->events_cap ? c->events_cap : 4096;
        while (cap < need) cap *= 2;
        uint8_t *events = realloc(c->events, cap);
        if (!events) return -1;
        c->events = events;
        c->events_cap = cap;
    }
    int32_t head[3] = {fd, kind, (int32_t)(uint32_t)length};
    memcpy(c->events + c->events_len, head, 12);
    if (length) memcpy(c->events + c->events_len + 12, payload, length);
    c->events_len = need;
    return 0;
}

static const char NOTIFY[] = "{\"type\":\"notify\"";
#define NOTIFY_LEN (sizeof(NOTIFY) - 1)

/* The float after "t": up to the next comma, as bench/loadgen.py reads it; 0 if none. */
static int sent_time(const uint8_t *p, size_t n, double *out) {
    const uint8_t *key = memmem(p, n, "\"t\":", 4);
    if (!key) return 0;
    const uint8_t *start = key + 4, *end = p + n;
    const uint8_t *comma = memchr(start, ',', (size_t)(end - start));
    if (comma) end = comma;
    char text[64];
    size_t len = (size_t)(end - start);
    if (len == 0 || len >= sizeof(text)) return 0;
    memcpy(text, start, len);
    text[len] = 0;
    char *rest;
    errno = 0;
    double value = strtod(text, &rest);
    if (rest == text) return 0;
    while (*rest == ' ' || *rest == '\t' || *rest == '\n' || *rest == '\r') rest++;
    if (*rest) return 0;
    *out = value;
    return 1;
}

/* Parse the complete frames of data[0:size]; answers the bytes consumed, or -1 after a
   terminal event (the descriptor is then dead). */
static long parse(ctx *c, int fd, fdstate *s, const uint8_t *data, size_t size,
                  int active, double arrival, double now, int64_t *notifies) {
    size_t pos = 0;
    while (size - pos >= 2) {
        uint8_t first = data[pos], second = data[pos + 1];
        uint64_t length = second & 0x7F;
        size_t head = 2;
        if (length == 126) {
            if (size - pos < 4) break;
            length = ((uint64_t)data[pos + 2] << 8) | data[pos + 3];
            head = 4;
        } else if (length == 127) {
            if (size - pos < 10) break;
            length = 0;
            for (int i = 2; i < 10; i++) length = (length << 8) | data[pos + i];
            head = 10;
        }
        if (second & 0x80) {
            s->dead = 1;
            event(c, fd, EV_PROTOCOL, (const uint8_t *)"masked frame from the server", 28);
            return -1;
        }
        if (length > c->max_frame || head + length > c->max_frame) {
            s->dead = 1;
            event(c, fd, EV_TOO_LARGE, NULL, 0);
            return -1;
        }
        size_t start = pos + head, end = start + (size_t)length;
        if (end > size) break;
        int opcode = first & 0x0F;
        const uint8_t *payload = data + start;
        if (opcode <= 2) {
            if (length >= NOTIFY_LEN && memcmp(payload, NOTIFY, NOTIFY_LEN) == 0) {
                s->notified++;
                (*notifies)++;
                if (active) {
                    c->frames++;
                    double sent;
                    if (sent_time(payload, (size_t)length, &sent)) {
                        hist_add(c, &c->lat, arrival - sent);
                        hist_add(c, &c->app, now - sent);
                    }
                }
            } else {
                event(c, fd, opcode, payload, (size_t)length);
            }
        } else if (opcode == 9) {
            event(c, fd, 9, payload, (size_t)length);
        } else if (opcode == 8) {
            s->dead = 1;
            event(c, fd, 8, payload, (size_t)length);
            return -1;
        }
        pos = end;
    }
    return (long)pos;
}

#define SMALL 4096

/* Room for `n` bytes in the descriptor's buffer (bounded by the frame cap, plus one read). */
static int grow(fdstate *s, size_t n) {
    if (n <= s->cap) return 0;
    size_t cap = s->cap ? s->cap : 256;
    while (cap < n) cap *= 2;
    uint8_t *buf = realloc(s->buf, cap);
    if (!buf) return -1;
    s->buf = buf;
    s->cap = cap;
    return 0;
}

static void release(fdstate *s) {
    free(s->buf);
    s->buf = NULL;
    s->len = s->cap = 0;
}

/* One read of `fd` and the frames it completes. */
static void read_one(ctx *c, int fd, int active, int64_t *notifies) {
    fdstate *s = &c->fds[fd];
    struct iovec iov = {c->scratch, READ_SIZE};
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    ssize_t got = recvmsg(fd, &msg, 0);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        int32_t code = errno;
        s->dead = 1;
        event(c, fd, EV_ERROR, (const uint8_t *)&code, 4);
        return;
    }
    if (got == 0) {
        s->dead = 1;
        event(c, fd, EV_EOF, NULL, 0);
        return;
    }
    double now = now_real(), arrival = now;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == FR_SO_TIMESTAMPNS
            && cm->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
            arrival = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        }
    }
    const uint8_t *data = c->scratch;
    size_t size = (size_t)got;
    if (s->len) {  /* a partial frame before: continue it in the descriptor's buffer */
        if (grow(s, s->len + size) < 0) {
            s->dead = 1;
            int32_t code = ENOMEM;
            event(c, fd, EV_ERROR, (const uint8_t *)&code, 4);
            return;
        }
        memcpy(s->buf + s->len, data, size);
        s->len += size;
        data = s->buf;
        size = s->len;
    }  /* else the common case: whole frames, parsed where they were read */
    long used = parse(c, fd, s, data, size, active, arrival, now, notifies);
    if (used < 0) {
        release(s);
        return;
    }
    size_t rest = size - (size_t)used;
    if (rest == 0) {
        s->len = 0;
        if (s->cap > SMALL) release(s);
    } else if (data == s->buf) {
        memmove(s->buf, data + used, rest);
        s->len = rest;
        if (s->cap > SMALL && rest < s->cap / 4) {
            uint8_t *buf = realloc(s->buf, rest < SMALL ? SMALL : rest);
            if (buf) {
                s->buf = buf;
                s->cap = rest < SMALL ? SMALL : rest;
            }
        }
    } else if (grow(s, rest) == 0) {
        memcpy(s->buf, data + used, rest);
        s->len = rest;
    } else {
        s->dead = 1;
        int32_t code = ENOMEM;
        event(c, fd, EV_ERROR, (const uint8_t *)&code, 4);
    }
}

/* One poll round. out[0]: notify frames read, out[1]: bytes of events, out[2]: descriptors
   ready. Answers 0, or -errno if epoll_wait failed. */
int fr_poll(ctx *c, int epfd, int active, int64_t *out) {
    c->events_len = 0;
    out[0] = out[1] = out[2] = 0;
    if (c->nready == 0) return 0;
    int n = epoll_wait(epfd, c->ready, c->nready, 0);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    int64_t notifies = 0;
    for (int i = 0; i < n; i++) {
        int fd = c->ready[i].data.fd;
        if (fd < 0 || fd >= c->nfds || !c->fds[fd].known || c->fds[fd].dead) continue;
        read_one(c, fd, active, &notifies);
    }
    out[0] = notifies;
    out[1] = (int64_t)c->events_len;
    out[2] = n;
    return 0;
}

const uint8_t *fr_events(ctx *c) { return c->events; }

/* The window: frames counted while active, and the two histograms (0: kernel, 1: app). */
int64_t fr_frames(ctx *c) { return c->frames; }

void fr_hist_add(ctx *c, int which, double seconds) { hist_add(c, which ? &c->app : &c->lat, seconds); }

/* Copies histogram `which` into buckets[nbuckets] and stats {count, total, max}. */
void fr_hist(ctx *c, int which, int64_t *buckets, double *stats) {
    hist *h = which ? &c->app : &c->lat;
    memcpy(buckets, h->buckets, sizeof(int64_t) * (size_t)c->nbuckets);
    stats[0] = (double)h->count;
    stats[1] = h->total;
    stats[2] = h->max;
}

void fr_window_reset(ctx *c) {
    c->frames = 0;
    hist_reset(c, &c->lat);
    hist_reset(c, &c->app);
}
