/* taskcodec frame socket, version 1: camera firmware hands raw frames to the runtime over a unix-domain socket
 * (the runtime listens: `taskcodec-runtime --source fw://PATH`). See docs/wire-format.md, firmware_bridge/frames.py.
 *
 * Per frame: a fixed 32-byte little-endian header, then width*height*channels bytes of packed pixels (row-major).
 *   0  4  magic "TCFR"         8  2  width (1..4096)        16 8  capture time, ms since the Unix epoch
 *   4  1  version (1)         10  2  height (1..4096)       24 4  label (int32, -1 = none)
 *   5  1  pixel format        12  4  payload length          28 4  reserved, 0
 *   6  1  channels (1 or 3)
 *   7  1  flags, 0
 * C99 + POSIX sockets; no allocation.
 */
#ifndef TASKCODEC_FRAMES_H
#define TASKCODEC_FRAMES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCF_VERSION 1u
#define TCF_HEADER_BYTES 32u
#define TCF_MAX_DIM 4096u
#define TCF_NO_LABEL (-1)

enum tcf_format { TCF_GRAY8 = 1, TCF_BGR24 = 2, TCF_RGB24 = 3 };

typedef enum {
    TCF_OK = 0,
    TCF_E_ARG = -1,    /* NULL pointer, unknown format, size outside 1..4096, wrong pixel count */
    TCF_E_PATH = -2,   /* socket path empty or too long for sockaddr_un */
    TCF_E_SOCKET = -3, /* socket() or connect() failed; errno says why (ENOENT, ECONNREFUSED: nobody listens) */
    TCF_E_IO = -4,     /* send failed; errno says why (EPIPE: the receiver dropped the connection) */
    TCF_E_FORMAT = -5  /* not a version-1 frame header */
} tcf_status;

typedef struct {
    uint16_t width;
    uint16_t height;
    uint8_t format;  /* enum tcf_format */
    uint64_t ts_ms;  /* capture time */
    int32_t label;   /* TCF_NO_LABEL unless the firmware knows ground truth (test rigs) */
} tcf_frame_info;

const char *tcf_strerror(int status);
int tcf_channels(uint8_t format);                /* 1 or 3, or TCF_E_ARG */
size_t tcf_payload_bytes(const tcf_frame_info *info); /* width*height*channels, 0 if invalid */
int tcf_encode_header(uint8_t out[TCF_HEADER_BYTES], const tcf_frame_info *info);
int tcf_decode_header(const uint8_t in[TCF_HEADER_BYTES], tcf_frame_info *info, uint32_t *payload_len);

/* Connect to the runtime's socket; returns a file descriptor >= 0 or a negative tcf_status. */
int tcf_connect(const char *path);
/* Send one frame (header + pixels, all of it: partial writes and EINTR are retried; never raises SIGPIPE). */
int tcf_send_frame(int fd, const tcf_frame_info *info, const uint8_t *pixels, size_t pixels_len);
void tcf_close(int fd);

#ifdef __cplusplus
}
#endif
#endif
