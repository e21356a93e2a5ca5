/* Example camera firmware: sends frames to the taskcodec runtime over the frame socket.
 *
 *   fw_camera_example SOCKET [--frames N] [--width W] [--height H] [--format gray8|bgr24|rgb24]
 *                     [--raw FILE] [--labels FILE] [--fps F] [--ts0 MS] [--dt MS] [--wait SECONDS]
 *
 * Without --raw it sends a synthetic pattern: pixel (x, y, channel c) of frame k is (3x + 5y + 11c + 7k) mod 256.
 * With --raw it sends consecutive W*H*C-byte frames read from FILE (stopping at its end), with --labels one label
 * byte per frame. Timestamps are the wall clock unless --ts0 is given (then ts0 + k * dt). --wait keeps retrying
 * the connection while the runtime is not listening yet. Exit status: 0 sent, 1 I/O error, 2 bad usage.
 */
#define _POSIX_C_SOURCE 200809L
#include "taskcodec_frames.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int usage(const char *msg)
{
    fprintf(stderr, "fw_camera_example: %s\n"
                    "usage: fw_camera_example SOCKET [--frames N] [--width W] [--height H] "
                    "[--format gray8|bgr24|rgb24] [--raw FILE] [--labels FILE] [--fps F] [--ts0 MS] [--dt MS] "
                    "[--wait SECONDS]\n", msg);
    return 2;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_s(double s)
{
    struct timespec ts;
    if (s <= 0)
        return;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static int parse_num(const char *s, double lo, double hi, double *out)
{
    char *end;
    double v;
    if (!s)
        return -1;
    errno = 0;
    v = strtod(s, &end);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    const char *path, *raw_path = NULL, *labels_path = NULL;
    double frames = 10, width = 64, height = 48, fps = 0, ts0 = -1, dt = 33, wait_s = 0;
    uint8_t format = TCF_BGR24;
    FILE *raw = NULL, *labels = NULL;
    tcf_frame_info info;
    uint8_t *pixels;
    size_t len, i;
    unsigned long k, sent = 0;
    int fd, rc, a, status = 0;
    struct timespec start;

    if (argc < 2 || argv[1][0] == '-')
        return usage("the first argument is the runtime's socket path");
    path = argv[1];
    for (a = 2; a < argc; a++) {
        const char *opt = argv[a], *val = a + 1 < argc ? argv[a + 1] : NULL;
        int bad = 0;
        if (!val)
            return usage("an option is missing its value");
        if (strcmp(opt, "--frames") == 0)
            bad = parse_num(val, 0, 1e9, &frames);
        else if (strcmp(opt, "--width") == 0)
            bad = parse_num(val, 1, TCF_MAX_DIM, &width);
        else if (strcmp(opt, "--height") == 0)
            bad = parse_num(val, 1, TCF_MAX_DIM, &height);
        else if (strcmp(opt, "--fps") == 0)
            bad = parse_num(val, 0, 1e6, &fps);
        else if (strcmp(opt, "--ts0") == 0)
            bad = parse_num(val, 0, 1e18, &ts0);
        else if (strcmp(opt, "--dt") == 0)
            bad = parse_num(val, 0, 1e9, &dt);
        else if (strcmp(opt, "--wait") == 0)
            bad = parse_num(val, 0, 3600, &wait_s);
        else if (strcmp(opt, "--raw") == 0)
            raw_path = val;
        else if (strcmp(opt, "--labels") == 0)
            labels_path = val;
        else if (strcmp(opt, "--format") == 0) {
            if (strcmp(val, "gray8") == 0)
                format = TCF_GRAY8;
            else if (strcmp(val, "bgr24") == 0)
                format = TCF_BGR24;
            else if (strcmp(val, "rgb24") == 0)
                format = TCF_RGB24;
            else
                bad = 1;
        } else
            return usage("unknown option");
        if (bad)
            return usage("an option has a bad value");
        a++;
    }
    info.width = (uint16_t)width;
    info.height = (uint16_t)height;
    info.format = format;
    info.label = TCF_NO_LABEL;
    len = tcf_payload_bytes(&info);
    if (len == 0)
        return usage("bad frame size");
    if (raw_path && !(raw = fopen(raw_path, "rb"))) {
        fprintf(stderr, "fw_camera_example: cannot open %s: %s\n", raw_path, strerror(errno));
        return 2;
    }
    if (labels_path && !(labels = fopen(labels_path, "rb"))) {
        fprintf(stderr, "fw_camera_example: cannot open %s: %s\n", labels_path, strerror(errno));
        if (raw)
            fclose(raw);
        return 2;
    }
    pixels = malloc(len); /* once, at start-up: the per-frame path allocates nothing */
    if (!pixels)
        return 1;

    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct timespec t;
        fd = tcf_connect(path);
        if (fd >= 0)
            break;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((double)(t.tv_sec - start.tv_sec) + (double)(t.tv_nsec - start.tv_nsec) * 1e-9 >= wait_s) {
            fprintf(stderr, "fw_camera_example: %s %s: %s\n", tcf_strerror(fd), path, strerror(errno));
            status = 1;
            goto done;
        }
        sleep_s(0.05);
    }

    for (k = 0; k < (unsigned long)frames; k++) {
        if (raw) {
            size_t got = fread(pixels, 1, len, raw);
            if (got == 0 && feof(raw))
                break;
            if (got != len) {
                fprintf(stderr, "fw_camera_example: %s ends inside frame %lu\n", raw_path, k);
                status = 1;
                break;
            }
        } else {
            int c = tcf_channels(format);
            size_t x, y;
            int ch;
            for (i = 0, y = 0; y < info.height; y++)
                for (x = 0; x < info.width; x++)
                    for (ch = 0; ch < c; ch++)
                        pixels[i++] = (uint8_t)((x * 3 + y * 5 + (size_t)ch * 11 + k * 7) & 0xFF);
        }
        if (labels) {
            int l = fgetc(labels);
            info.label = l == EOF ? TCF_NO_LABEL : l;
        }
        info.ts_ms = ts0 >= 0 ? (uint64_t)ts0 + (uint64_t)(k * dt) : now_ms();
        rc = tcf_send_frame(fd, &info, pixels, len);
        if (rc != TCF_OK) {
            fprintf(stderr, "fw_camera_example: frame %lu: %s: %s\n", k, tcf_strerror(rc), strerror(errno));
            status = 1;
            break;
        }
        sent++;
        if (fps > 0)
            sleep_s(1.0 / fps);
    }
    tcf_close(fd);
    fprintf(stderr, "fw_camera_example: sent %lu frames of %ux%u to %s\n", sent, info.width, info.height, path);
done:
    free(pixels);
    if (raw)
        fclose(raw);
    if (labels)
        fclose(labels);
    return status;
}
