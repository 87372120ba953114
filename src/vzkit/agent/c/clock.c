/* vzkit-agent: SET_CLOCK (protocol 2.3) — step the guest's CLOCK_REALTIME to the host's.
 *
 * The host sends its CLOCK_REALTIME in nanoseconds after a resume, a snapshot restore or a
 * host sleep, when the guest's clock stood still while the host's went on. A difference above
 * the threshold is stepped with clock_settime (what vfkit's agent does for vz guests); smaller
 * ones are left to the guest (NTP, if any). The answer, CLOCK, says the step made.
 *
 * Test hook: with --clock-dry-run, and always in the --stdio/--unix test modes, the agent only
 * reports the step it would make (flag CLOCK_DRY_RUN): a test run on a host must never set the
 * host's clock, even as root. */
#include "agent.h"

#include <errno.h>
#include <string.h>
#include <time.h>

bool g_clock_dry_run;

static int64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int clock_set(struct session *s, uint32_t id, const unsigned char *p, size_t n)
{
    if (n != 12)
        return -1;
    int64_t host = (int64_t)((uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32);
    uint32_t threshold_ms = get_u32(p + 8);
    if (!threshold_ms)
        threshold_ms = CLOCK_THRESHOLD_MS;
    int64_t step = host - realtime_ns();
    uint32_t flags = 0;
    int64_t mag = step < 0 ? -step : step;
    if (mag <= (int64_t)threshold_ms * 1000000) {
        step = 0;
    } else if (g_clock_dry_run) {
        flags |= CLOCK_DRY_RUN;
    } else {
        int64_t to = realtime_ns() + step; /* what elapsed since the comparison counts too */
        struct timespec ts = {.tv_sec = to / 1000000000, .tv_nsec = to % 1000000000};
        if (ts.tv_nsec < 0) {
            ts.tv_sec -= 1;
            ts.tv_nsec += 1000000000;
        }
        if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
            int err = errno;
            send_error(s, id, err, "set_clock: %s", strerror(err));
            return 0;
        }
        logmsg("stepped the clock by %+.3f s (the host's time)", (double)step / 1e9);
    }
    unsigned char r[12];
    put_u64(r, (uint64_t)step);
    put_u32(r + 8, flags);
    send_frame(s, T_CLOCK, id, r, sizeof r);
    return 0;
}
