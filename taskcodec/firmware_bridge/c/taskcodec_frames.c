/* taskcodec frame socket v1, sender side. See taskcodec_frames.h. */
#define _POSIX_C_SOURCE 200809L
#include "taskcodec_frames.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static const uint8_t MAGIC[4] = {'T', 'C', 'F', 'R'};

const char *tcf_strerror(int status)
{
    switch (status) {
    case TCF_OK: return "ok";
    case TCF_E_ARG: return "invalid frame";
    case TCF_E_PATH: return "socket path empty or too long";
    case TCF_E_SOCKET: return "cannot connect to the frame socket";
    case TCF_E_IO: return "sending the frame failed";
    case TCF_E_FORMAT: return "not a version-1 frame header";
    default: return "unknown error";
    }
}

int tcf_channels(uint8_t format)
{
    switch (format) {
    case TCF_GRAY8: return 1;
    case TCF_BGR24:
    case TCF_RGB24: return 3;
    default: return TCF_E_ARG;
    }
}

size_t tcf_payload_bytes(const tcf_frame_info *info)
{
    int c;
    if (!info || info->width < 1 || info->width > TCF_MAX_DIM || info->height < 1 || info->height > TCF_MAX_DIM)
        return 0;
    c = tcf_channels(info->format);
    return c < 0 ? 0 : (size_t)info->width * info->height * (size_t)c;
}

static void put_le(uint8_t *p, uint64_t v, int n)
{
    int i;
    for (i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    int i;
    for (i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

int tcf_encode_header(uint8_t out[TCF_HEADER_BYTES], const tcf_frame_info *info)
{
    size_t payload = tcf_payload_bytes(info);
    if (!out || payload == 0)
        return TCF_E_ARG;
    memcpy(out, MAGIC, 4);
    out[4] = TCF_VERSION;
    out[5] = info->format;
    out[6] = (uint8_t)tcf_channels(info->format);
    out[7] = 0;
    put_le(out + 8, info->width, 2);
    put_le(out + 10, info->height, 2);
    put_le(out + 12, payload, 4);
    put_le(out + 16, info->ts_ms, 8);
    put_le(out + 24, (uint32_t)info->label, 4);
    put_le(out + 28, 0, 4);
    return TCF_OK;
}

int tcf_decode_header(const uint8_t in[TCF_HEADER_BYTES], tcf_frame_info *info, uint32_t *payload_len)
{
    tcf_frame_info f;
    int c;
    if (!in || !info || !payload_len)
        return TCF_E_ARG;
    if (memcmp(in, MAGIC, 4) != 0 || in[4] != TCF_VERSION || in[7] != 0 || get_le(in + 28, 4) != 0)
        return TCF_E_FORMAT;
    c = tcf_channels(in[5]);
    if (c < 0 || in[6] != c)
        return TCF_E_FORMAT;
    f.format = in[5];
    f.width = (uint16_t)get_le(in + 8, 2);
    f.height = (uint16_t)get_le(in + 10, 2);
    f.ts_ms = get_le(in + 16, 8);
    f.label = (int32_t)(uint32_t)get_le(in + 24, 4);
    if (tcf_payload_bytes(&f) == 0 || get_le(in + 12, 4) != tcf_payload_bytes(&f))
        return TCF_E_FORMAT;
    *info = f;
    *payload_len = (uint32_t)tcf_payload_bytes(&f);
    return TCF_OK;
}

int tcf_connect(const char *path)
{
    struct sockaddr_un addr;
    size_t n;
    int fd;
    if (!path || (n = strlen(path)) == 0 || n >= sizeof(addr.sun_path))
        return TCF_E_PATH;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, n);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return TCF_E_SOCKET;
    while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        if (errno != EINTR) {
            int saved = errno;
            close(fd);
            errno = saved;
            return TCF_E_SOCKET;
        }
    }
    return fd;
}

int tcf_send_frame(int fd, const tcf_frame_info *info, const uint8_t *pixels, size_t pixels_len)
{
    uint8_t header[TCF_HEADER_BYTES];
    struct iovec iov[2];
    struct msghdr msg;
    size_t total, sent = 0;
    if (fd < 0 || !pixels || tcf_payload_bytes(info) != pixels_len || tcf_encode_header(header, info) != TCF_OK)
        return TCF_E_ARG;
    total = TCF_HEADER_BYTES + pixels_len;
    while (sent < total) {
        ssize_t k;
        int n = 0;
        memset(&msg, 0, sizeof(msg));
        if (sent < TCF_HEADER_BYTES) {
            iov[n].iov_base = header + sent;
            iov[n++].iov_len = TCF_HEADER_BYTES - sent;
            iov[n].iov_base = (void *)pixels;
            iov[n++].iov_len = pixels_len;
        } else {
            iov[n].iov_base = (void *)(pixels + (sent - TCF_HEADER_BYTES));
            iov[n++].iov_len = total - sent;
        }
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)n;
        k = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return TCF_E_IO;
        }
        sent += (size_t)k;
    }
    return TCF_OK;
}

void tcf_close(int fd)
{
    if (fd >= 0)
        close(fd);
}
