/* taskcodec uplink wire format, version 4 (see docs/wire-format.md; taskcodec/wire.py is the reference).
 *
 * C99, no allocation: every function works on caller buffers, checks every bound and returns a tcw_status.
 * Cameras encode HELLO and BATCH and decode the server's replies (WELCOME, ACK, REJECT, ERROR).
 */
#ifndef TASKCODEC_WIRE_H
#define TASKCODEC_WIRE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCW_VERSION 4u
#define TCW_CAP_TEMPORAL 1u     /* HELLO/WELCOME capability bit (v3): TBATCH frames KEY / COND / SAME */
#define TCW_RESIDUAL_TAG_BYTES 8u
#define TCW_MODEL_TAG_BYTES 8u
#define TCW_MAX_FRAMES_PER_BATCH 4096u
#define TCW_MAX_FRAME_BYTES 65536u
#define TCW_MAX_REASON_BYTES 1024u
#define TCW_MAX_EPOCH 9223372036854775807ull  /* 2^63-1, inclusive: a random 63-bit id drawn with the spool */
#define TCW_MAX_SEQ 9223372036854775807ull    /* 2^63-1, inclusive */
#define TCW_MAX_ABS_TS_MS 4611686018427387903ll /* 2^62-1: capture times lie in [-(2^62-1), 2^62-1] ms */
#define TCW_MAX_VARINT_BYTES 10u
#define TCW_STREAM_CHECK_BYTES 2u

/* Message types: the first byte of every message. */
enum tcw_type {
    TCW_HELLO = 0x01,
    TCW_BATCH = 0x02,
    TCW_ACK = 0x03,
    TCW_REJECT = 0x04,
    TCW_ERROR = 0x05,
    TCW_WELCOME = 0x06,
    TCW_TBATCH = 0x07, /* v3: a BATCH whose frames carry their kind (only after a WELCOME granting TCW_CAP_TEMPORAL) */
    TCW_CBATCH = 0x08  /* v4: the compact TBATCH (header continues the connection's previous CBATCH, SAME runs) */
};

/* CBATCH (v4) header flags: the field is present (absent: it continues the connection's previous CBATCH). */
#define TCW_CB_EPOCH 1u
#define TCW_CB_SEQ 2u
#define TCW_CB_TIME 4u
#define TCW_CB_INTERVAL 8u
#define TCW_MAX_INTERVAL_MS 4294967295ull /* 2^32-1 */
#define TCW_MAX_DEVIATION_MS 576460752303423488ll /* 2^59: larger steps are sent as absolute times */
#define TCW_MAX_RUN_ITEM 32u  /* SAME frames per run item (its head stays one byte) */

/* TBATCH frame kinds (the low 2 bits of each frame's length varint: length << 2 | kind). */
enum tcw_kind {
    TCW_KIND_KEY = 0,  /* coded on its own (the ordinary payload) */
    TCW_KIND_COND = 1, /* the residual to the connection's reference, coded with the bundle's residual tables */
    TCW_KIND_SAME = 2  /* no payload: the reference stands for this frame too */
};

/* Reason codes carried by REJECT and ERROR. */
enum tcw_code {
    TCW_CODE_BAD_MESSAGE = 1,
    TCW_CODE_UNAUTHORIZED = 2,
    TCW_CODE_UNKNOWN_MODEL = 3,
    TCW_CODE_BAD_PAYLOAD = 4,
    TCW_CODE_BUSY = 5,
    TCW_CODE_CONFLICT = 6, /* REJECT: (camera, epoch, seq) already stored with another payload (v2) */
    TCW_CODE_RESYNC = 7    /* ERROR (v3): the server lost this connection's reference: reconnect, start with KEY */
};

/* Return values: 0 is success, every failure is negative. */
typedef enum {
    TCW_OK = 0,
    TCW_E_ARG = -1,       /* NULL pointer, or a field outside what the format allows */
    TCW_E_NOSPACE = -2,   /* the caller's output buffer is too small (nothing useful was written) */
    TCW_E_TRUNCATED = -3, /* the message ends early */
    TCW_E_VARINT = -4,    /* a varint longer than 10 bytes */
    TCW_E_RANGE = -5,     /* a decoded value exceeds the format's limit */
    TCW_E_TYPE = -6,      /* unknown message type, or one a camera never receives */
    TCW_E_TRAILING = -7,  /* bytes after the end of the message */
    TCW_E_VERSION = -8,   /* wire version this library does not speak */
    TCW_E_STATE = -9      /* batch builder used out of order (no frame, too many frames, finished) */
} tcw_status;

const char *tcw_strerror(int status);

/* Unsigned LEB128. put: writes at buf[*pos], advances *pos. get: reads at buf[*pos], fails above `limit`. */
int tcw_put_varint(uint8_t *buf, size_t cap, size_t *pos, uint64_t value);
int tcw_get_varint(const uint8_t *buf, size_t len, size_t *pos, uint64_t limit, uint64_t *value);

/* Zig-zag: signed <-> unsigned (0, -1, 1, -2, ... <-> 0, 1, 2, 3, ...); a signed varint is the varint of zigzag(v). */
uint64_t tcw_zigzag(int64_t v);
int64_t tcw_unzigzag(uint64_t u);

/* HELLO (v3): camera_id is 1..255 bytes of utf-8 (not NUL-terminated necessarily), token 0..255 bytes.
 * tcw_encode_hello asks for no capability; tcw_encode_hello_caps with TCW_CAP_TEMPORAL also sends the 8-byte
 * residual tag of the bundle's residual tables (manifest "temporal.residual_tag"), NULL otherwise. */
int tcw_encode_hello(uint8_t *out, size_t cap, size_t *out_len, const uint8_t model_tag[TCW_MODEL_TAG_BYTES],
                     const char *camera_id, size_t camera_id_len, const uint8_t *token, size_t token_len);
int tcw_encode_hello_caps(uint8_t *out, size_t cap, size_t *out_len, const uint8_t model_tag[TCW_MODEL_TAG_BYTES],
                          const char *camera_id, size_t camera_id_len, const uint8_t *token, size_t token_len,
                          uint32_t capabilities, const uint8_t *residual_tag);

/* BATCH, built in place in the caller's buffer as frames arrive:
 *   tcw_batch_begin(&b, buf, cap, epoch, first_seq);
 *   tcw_batch_add(&b, ts_ms, payload, len);   ... 1..4096 times
 *   tcw_batch_finish(&b, &msg_len);            -> the message is buf[0..msg_len)
 * Frames get sequence numbers first_seq, first_seq + 1, ...; the first frame's time is the batch's base time and
 * each frame carries the signed difference to the previous frame's time, so a clock that steps backwards or
 * forwards (by years) inside a batch keeps every frame's true time. Times are ms since the Unix epoch, within
 * +-TCW_MAX_ABS_TS_MS (negative: before 1970). A buffer of exactly the final message size suffices. A failed add
 * leaves the batch as it was, so the caller can finish it and put the frame in the next batch. */
typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    size_t count_pos; /* where the count goes (1 byte reserved, 2 from the 128th frame) */
    uint64_t first_seq;
    uint32_t count;
    int64_t prev_ts;
    int finished;
    int temporal; /* a TBATCH (tcw_batch_begin_temporal) */
} tcw_batch;

int tcw_batch_begin(tcw_batch *b, uint8_t *buf, size_t cap, uint64_t epoch, uint64_t first_seq);
int tcw_batch_add(tcw_batch *b, int64_t ts_ms, const uint8_t *payload, size_t payload_len);
/* TBATCH (v3): the same builder; each frame has a kind (tcw_kind; a SAME frame has payload_len 0). Only on a
 * connection whose WELCOME granted TCW_CAP_TEMPORAL; tcw_batch_add on a TBATCH adds a KEY frame. */
int tcw_batch_begin_temporal(tcw_batch *b, uint8_t *buf, size_t cap, uint64_t epoch, uint64_t first_seq);
int tcw_batch_add_kind(tcw_batch *b, int64_t ts_ms, unsigned kind, const uint8_t *payload, size_t payload_len);
int tcw_batch_finish(tcw_batch *b, size_t *out_len);

/* CBATCH (v4), the compact TBATCH, built in place like a BATCH:
 *   tcw_link link; tcw_link_reset(&link);                     once per connection (after its WELCOME)
 *   tcw_cbatch_begin(&c, buf, cap, &link, epoch, first_seq, interval_ms);
 *   tcw_cbatch_add(&c, ts_ms, kind, payload, len);            ... 1..4096 times
 *   tcw_cbatch_finish(&c, &msg_len);                          -> buf[0..msg_len), and the link moves on to it
 * The link is the connection's previous CBATCH: header fields that continue it are left out (epoch; first_seq =
 * its last + 1; the base time: the first frame is expected interval_ms after its last frame). A frame captured
 * interval_ms after the previous one carries no time (else a TIME item: the deviation, which for a SAME frame is
 * the whole frame, or the absolute time for a clock step); consecutive SAME frames at the interval share one-byte
 * run items. Send every finished CBATCH, in
 * order, on the connection whose link it used; reset the link on a new connection and whenever a finished CBATCH
 * was not sent. A failed add leaves the batch as it was. Only on a version-4 connection granted TCW_CAP_TEMPORAL. */
typedef struct {
    int have; /* 0: no CBATCH yet on this connection: the next one carries every field */
    uint64_t epoch;
    uint64_t last_seq;
    int64_t last_ts;
    uint32_t interval_ms;
} tcw_link;

typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    size_t count_pos; /* where the count goes (after the header; 1 byte reserved, 2 from the 128th frame) */
    size_t run_pos;   /* the open SAME-run item's byte (valid while run > 0) */
    uint32_t run;     /* frames in the open SAME-run item */
    uint64_t epoch;
    uint64_t first_seq;
    uint32_t count;
    uint32_t interval_ms;
    int64_t prev_ts;
    int finished;
    tcw_link *link;
} tcw_cbatch;

void tcw_link_reset(tcw_link *link);
int tcw_cbatch_begin(tcw_cbatch *c, uint8_t *buf, size_t cap, tcw_link *link, uint64_t epoch, uint64_t first_seq,
                     uint32_t interval_ms);
int tcw_cbatch_add(tcw_cbatch *c, int64_t ts_ms, unsigned kind, const uint8_t *payload, size_t payload_len);
int tcw_cbatch_finish(tcw_cbatch *c, size_t *out_len);

/* One-shot BATCH from an array of frames (frame i has sequence number first_seq + i). */
typedef struct {
    int64_t ts_ms;
    const uint8_t *payload;
    size_t len;
} tcw_frame;

int tcw_encode_batch(uint8_t *out, size_t cap, size_t *out_len, uint64_t epoch, uint64_t first_seq,
                     const tcw_frame *frames, size_t count);

/* A server reply. `reason` points into the decoded message (valid while it is), `reason_len` bytes, not
 * NUL-terminated, utf-8 as sent. Fields a type does not carry are zero. */
typedef struct {
    uint8_t type;      /* TCW_WELCOME, TCW_ACK, TCW_REJECT or TCW_ERROR */
    uint8_t version;   /* WELCOME */
    uint8_t code;      /* REJECT, ERROR */
    uint64_t epoch;    /* ACK, REJECT */
    uint64_t first_seq;
    uint64_t count;
    const uint8_t *reason; /* REJECT, ERROR */
    size_t reason_len;
    uint32_t capabilities; /* WELCOME v3: what the server grants (TCW_CAP_TEMPORAL) */
} tcw_reply;

int tcw_decode_reply(const uint8_t *msg, size_t len, tcw_reply *out);

/* The 2-byte per-frame stream check (taskcodec/coding/stream.py): CRC-16/CCITT (poly 0x1021, init 0xFFFF, no
 * reflection) over model_tag || u32le(payload_len) || payload, xor 0xFFFF, stored little-endian. A camera that
 * builds frame payloads itself writes these 2 bytes before the range-coder words. */
void tcw_stream_check(const uint8_t *model_tag, size_t tag_len, const uint8_t *payload, size_t payload_len,
                      uint8_t out[TCW_STREAM_CHECK_BYTES]);

#ifdef __cplusplus
}
#endif
#endif
