/* taskcodec uplink wire format v4: encoders for camera messages, decoder for server replies. See taskcodec_wire.h. */
#include "taskcodec_wire.h"

#include <string.h>

const char *tcw_strerror(int status)
{
    switch (status) {
    case TCW_OK: return "ok";
    case TCW_E_ARG: return "invalid argument";
    case TCW_E_NOSPACE: return "output buffer too small";
    case TCW_E_TRUNCATED: return "message ends early";
    case TCW_E_VARINT: return "varint too long";
    case TCW_E_RANGE: return "value exceeds the format's limit";
    case TCW_E_TYPE: return "unexpected message type";
    case TCW_E_TRAILING: return "trailing bytes after the message";
    case TCW_E_VERSION: return "unsupported wire version";
    case TCW_E_STATE: return "batch builder used out of order";
    default: return "unknown error";
    }
}

static size_t varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

int tcw_put_varint(uint8_t *buf, size_t cap, size_t *pos, uint64_t value)
{
    size_t n, i;
    if (!buf || !pos || *pos > cap)
        return TCW_E_ARG;
    n = varint_size(value);
    if (cap - *pos < n)
        return TCW_E_NOSPACE;
    for (i = 0; i + 1 < n; i++) {
        buf[(*pos)++] = (uint8_t)((value & 0x7F) | 0x80);
        value >>= 7;
    }
    buf[(*pos)++] = (uint8_t)value;
    return TCW_OK;
}

int tcw_get_varint(const uint8_t *buf, size_t len, size_t *pos, uint64_t limit, uint64_t *value)
{
    uint64_t v = 0;
    unsigned shift = 0;
    size_t p;
    if (!buf || !pos || !value || *pos > len)
        return TCW_E_ARG;
    p = *pos;
    for (;;) {
        uint8_t byte;
        if (p >= len)
            return TCW_E_TRUNCATED;
        byte = buf[p++];
        if (shift == 63) {
            /* 10th byte: only bit 63 fits in 64 bits; anything higher does not fit a uint64. */
            if (byte & 0x80)
                return TCW_E_VARINT;
            if (byte & 0x7E)
                return TCW_E_RANGE;
        }
        v |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80))
            break;
        shift += 7;
    }
    if (v > limit)
        return TCW_E_RANGE;
    *value = v;
    *pos = p;
    return TCW_OK;
}

uint64_t tcw_zigzag(int64_t v)
{
    return v < 0 ? ~((uint64_t)v << 1) : (uint64_t)v << 1;
}

int64_t tcw_unzigzag(uint64_t u)
{
    return (u & 1) ? (int64_t)(-(int64_t)(u >> 1) - 1) : (int64_t)(u >> 1);
}

int tcw_encode_hello(uint8_t *out, size_t cap, size_t *out_len, const uint8_t model_tag[TCW_MODEL_TAG_BYTES],
                     const char *camera_id, size_t camera_id_len, const uint8_t *token, size_t token_len)
{
    return tcw_encode_hello_caps(out, cap, out_len, model_tag, camera_id, camera_id_len, token, token_len, 0, NULL);
}

int tcw_encode_hello_caps(uint8_t *out, size_t cap, size_t *out_len, const uint8_t model_tag[TCW_MODEL_TAG_BYTES],
                          const char *camera_id, size_t camera_id_len, const uint8_t *token, size_t token_len,
                          uint32_t capabilities, const uint8_t *residual_tag)
{
    size_t need, pos;
    uint8_t *p;
    int temporal = (capabilities & TCW_CAP_TEMPORAL) != 0;
    if (!out || !out_len || !model_tag || !camera_id || (token_len && !token) || (temporal && !residual_tag))
        return TCW_E_ARG;
    if (camera_id_len < 1 || camera_id_len > 255 || token_len > 255)
        return TCW_E_ARG;
    need = 2 + TCW_MODEL_TAG_BYTES + 1 + camera_id_len + 1 + token_len + varint_size(capabilities) +
           (temporal ? TCW_RESIDUAL_TAG_BYTES : 0);
    if (cap < need)
        return TCW_E_NOSPACE;
    p = out;
    *p++ = TCW_HELLO;
    *p++ = TCW_VERSION;
    memcpy(p, model_tag, TCW_MODEL_TAG_BYTES);
    p += TCW_MODEL_TAG_BYTES;
    *p++ = (uint8_t)camera_id_len;
    memcpy(p, camera_id, camera_id_len);
    p += camera_id_len;
    *p++ = (uint8_t)token_len;
    if (token_len)
        memcpy(p, token, token_len);
    p += token_len;
    pos = (size_t)(p - out);
    tcw_put_varint(out, cap, &pos, capabilities); /* room checked above */
    if (temporal)
        memcpy(out + pos, residual_tag, TCW_RESIDUAL_TAG_BYTES);
    *out_len = need;
    return TCW_OK;
}

int tcw_batch_begin(tcw_batch *b, uint8_t *buf, size_t cap, uint64_t epoch, uint64_t first_seq)
{
    size_t pos = 0;
    int rc;
    if (!b || !buf)
        return TCW_E_ARG;
    memset(b, 0, sizeof(*b));
    if (epoch > TCW_MAX_EPOCH || first_seq > TCW_MAX_SEQ)
        return TCW_E_ARG;
    if (cap < 1)
        return TCW_E_NOSPACE;
    buf[pos++] = TCW_BATCH;
    if ((rc = tcw_put_varint(buf, cap, &pos, epoch)) != TCW_OK)
        return rc;
    if ((rc = tcw_put_varint(buf, cap, &pos, first_seq)) != TCW_OK)
        return rc;
    if (cap - pos < 1) /* the count is written by finish; 1 byte now, grown to 2 at the 128th frame */
        return TCW_E_NOSPACE;
    b->buf = buf;
    b->cap = cap;
    b->count_pos = pos;
    b->len = pos + 1;
    b->first_seq = first_seq;
    return TCW_OK;
}

int tcw_batch_begin_temporal(tcw_batch *b, uint8_t *buf, size_t cap, uint64_t epoch, uint64_t first_seq)
{
    int rc = tcw_batch_begin(b, buf, cap, epoch, first_seq);
    if (rc != TCW_OK)
        return rc;
    buf[0] = TCW_TBATCH;
    b->temporal = 1;
    return TCW_OK;
}

int tcw_batch_add(tcw_batch *b, int64_t ts_ms, const uint8_t *payload, size_t payload_len)
{
    return tcw_batch_add_kind(b, ts_ms, TCW_KIND_KEY, payload, payload_len);
}

int tcw_batch_add_kind(tcw_batch *b, int64_t ts_ms, unsigned kind, const uint8_t *payload, size_t payload_len)
{
    uint64_t base = 0, delta, length;
    size_t need, pos, grow;
    if (!b || !b->buf || (payload_len && !payload))
        return TCW_E_ARG;
    if (kind > TCW_KIND_SAME || (kind == TCW_KIND_SAME && payload_len) || (!b->temporal && kind != TCW_KIND_KEY))
        return TCW_E_ARG;
    if (b->finished || b->count >= TCW_MAX_FRAMES_PER_BATCH)
        return TCW_E_STATE;
    if (payload_len > TCW_MAX_FRAME_BYTES || b->first_seq + b->count > TCW_MAX_SEQ)
        return TCW_E_ARG; /* (first_seq <= 2^63-1 and count <= 4096: the sum does not wrap) */
    if (ts_ms > TCW_MAX_ABS_TS_MS || ts_ms < -TCW_MAX_ABS_TS_MS)
        return TCW_E_ARG;
    if (b->count == 0) {
        base = tcw_zigzag(ts_ms);
        delta = 0;
    } else {
        delta = tcw_zigzag(ts_ms - b->prev_ts); /* both within +-(2^62-1): no overflow */
    }
    length = b->temporal ? ((uint64_t)payload_len << 2 | kind) : (uint64_t)payload_len;
    grow = b->count == 0x7F; /* the 128th frame makes the count a 2-byte varint */
    need = grow + (b->count == 0 ? varint_size(base) : 0) + varint_size(delta) + varint_size(length) + payload_len;
    if (b->cap - b->len < need)
        return TCW_E_NOSPACE;
    if (grow) {
        memmove(b->buf + b->count_pos + 2, b->buf + b->count_pos + 1, b->len - b->count_pos - 1);
        b->len += 1;
    }
    pos = b->len;
    if (b->count == 0)
        tcw_put_varint(b->buf, b->cap, &pos, base);
    tcw_put_varint(b->buf, b->cap, &pos, delta);
    tcw_put_varint(b->buf, b->cap, &pos, length);
    if (payload_len)
        memcpy(b->buf + pos, payload, payload_len);
    b->len = pos + payload_len;
    b->prev_ts = ts_ms;
    b->count++;
    return TCW_OK;
}

int tcw_batch_finish(tcw_batch *b, size_t *out_len)
{
    size_t pos;
    if (!b || !b->buf || !out_len)
        return TCW_E_ARG;
    if (b->finished || b->count == 0)
        return TCW_E_STATE;
    pos = b->count_pos; /* the space reserved for the count has exactly its varint size */
    tcw_put_varint(b->buf, b->cap, &pos, b->count);
    b->finished = 1;
    *out_len = b->len;
    return TCW_OK;
}

int tcw_encode_batch(uint8_t *out, size_t cap, size_t *out_len, uint64_t epoch, uint64_t first_seq,
                     const tcw_frame *frames, size_t count)
{
    tcw_batch b;
    size_t i;
    int rc;
    if (!out || !out_len || (count && !frames))
        return TCW_E_ARG;
    if (count == 0 || count > TCW_MAX_FRAMES_PER_BATCH)
        return TCW_E_ARG;
    if ((rc = tcw_batch_begin(&b, out, cap, epoch, first_seq)) != TCW_OK)
        return rc;
    for (i = 0; i < count; i++)
        if ((rc = tcw_batch_add(&b, frames[i].ts_ms, frames[i].payload, frames[i].len)) != TCW_OK)
            return rc;
    return tcw_batch_finish(&b, out_len);
}

void tcw_link_reset(tcw_link *link)
{
    if (link)
        memset(link, 0, sizeof(*link));
}

int tcw_cbatch_begin(tcw_cbatch *c, uint8_t *buf, size_t cap, tcw_link *link, uint64_t epoch, uint64_t first_seq,
                     uint32_t interval_ms)
{
    if (!c || !buf || !link)
        return TCW_E_ARG;
    memset(c, 0, sizeof(*c));
    if (epoch > TCW_MAX_EPOCH || first_seq > TCW_MAX_SEQ)
        return TCW_E_ARG;
    c->buf = buf;
    c->cap = cap;
    c->link = link;
    c->epoch = epoch;
    c->first_seq = first_seq;
    c->interval_ms = interval_ms;
    return TCW_OK; /* the header is written with the first frame (its time is the base time of a first CBATCH) */
}

static unsigned cbatch_flags(const tcw_cbatch *c)
{
    const tcw_link *l = c->link;
    unsigned flags = 0;
    if (!l->have || l->epoch != c->epoch)
        flags |= TCW_CB_EPOCH;
    if (!l->have || l->last_seq + 1 != c->first_seq) /* last_seq <= 2^63-1: no wrap */
        flags |= TCW_CB_SEQ;
    if (!l->have)
        flags |= TCW_CB_TIME;
    if (!l->have || l->interval_ms != c->interval_ms)
        flags |= TCW_CB_INTERVAL;
    return flags;
}

int tcw_cbatch_add(tcw_cbatch *c, int64_t ts_ms, unsigned kind, const uint8_t *payload, size_t payload_len)
{
    unsigned flags = 0;
    int64_t expected, dev = 0;
    uint64_t time_head = 0, item_head = 0;
    size_t need = 0, pos, grow;
    int extend, absolute = 0, merged = 0;
    if (!c || !c->buf || !c->link || (payload_len && !payload))
        return TCW_E_ARG;
    if (kind > TCW_KIND_SAME || (kind == TCW_KIND_SAME && payload_len))
        return TCW_E_ARG;
    if (c->finished || c->count >= TCW_MAX_FRAMES_PER_BATCH)
        return TCW_E_STATE;
    if (payload_len > TCW_MAX_FRAME_BYTES || c->first_seq + c->count > TCW_MAX_SEQ)
        return TCW_E_ARG;
    if (ts_ms > TCW_MAX_ABS_TS_MS || ts_ms < -TCW_MAX_ABS_TS_MS)
        return TCW_E_ARG;
    if (c->count == 0) {
        flags = cbatch_flags(c);
        expected = (flags & TCW_CB_TIME) ? ts_ms : c->link->last_ts + (int64_t)c->interval_ms;
        need = 2 + 1; /* type, flags, count (1 byte reserved) */
        if (flags & TCW_CB_EPOCH)
            need += varint_size(c->epoch);
        if (flags & TCW_CB_SEQ)
            need += varint_size(c->first_seq);
        if (flags & TCW_CB_TIME)
            need += varint_size(tcw_zigzag(ts_ms));
        if (flags & TCW_CB_INTERVAL)
            need += varint_size(c->interval_ms);
    } else {
        expected = c->prev_ts + (int64_t)c->interval_ms;
    }
    dev = ts_ms - expected; /* |ts| <= 2^62-1 and |expected| <= 2^62 + 2^32: no overflow */
    if (dev) {
        if (dev <= TCW_MAX_DEVIATION_MS && dev >= -TCW_MAX_DEVIATION_MS) {
            merged = kind == TCW_KIND_SAME; /* a SAME frame off the interval is one item: its deviation */
            time_head = ((tcw_zigzag(dev) << 1 | (uint64_t)merged) + 1) << 2 | 3;
            need += varint_size(time_head);
        } else {
            absolute = 1;
            need += 1 + varint_size(tcw_zigzag(ts_ms));
        }
    }
    extend = kind == TCW_KIND_SAME && !dev && c->run > 0 && c->run < TCW_MAX_RUN_ITEM;
    if (!extend && !merged) {
        item_head = kind == TCW_KIND_SAME ? TCW_KIND_SAME : ((uint64_t)payload_len << 2 | kind);
        need += varint_size(item_head) + payload_len;
    }
    grow = c->count == 0x7F; /* the 128th frame makes the count a 2-byte varint */
    need += grow;
    if (c->cap - c->len < need || c->cap < c->len)
        return TCW_E_NOSPACE;
    if (c->count == 0) {
        pos = 0;
        c->buf[pos++] = TCW_CBATCH;
        c->buf[pos++] = (uint8_t)flags;
        if (flags & TCW_CB_EPOCH)
            tcw_put_varint(c->buf, c->cap, &pos, c->epoch);
        if (flags & TCW_CB_SEQ)
            tcw_put_varint(c->buf, c->cap, &pos, c->first_seq);
        if (flags & TCW_CB_TIME)
            tcw_put_varint(c->buf, c->cap, &pos, tcw_zigzag(ts_ms));
        if (flags & TCW_CB_INTERVAL)
            tcw_put_varint(c->buf, c->cap, &pos, c->interval_ms);
        c->count_pos = pos;
        c->len = pos + 1;
    }
    if (grow) {
        memmove(c->buf + c->count_pos + 2, c->buf + c->count_pos + 1, c->len - c->count_pos - 1);
        c->len += 1;
        c->run_pos += 1;
    }
    pos = c->len;
    if (dev) {
        c->run = 0;
        if (absolute) {
            c->buf[pos++] = 3;
            tcw_put_varint(c->buf, c->cap, &pos, tcw_zigzag(ts_ms));
        } else {
            tcw_put_varint(c->buf, c->cap, &pos, time_head);
        }
    }
    if (merged) {
        /* the TIME item is the frame */
    } else if (extend) {
        c->run++;
        c->buf[c->run_pos] = (uint8_t)((c->run - 1) << 2 | TCW_KIND_SAME);
    } else {
        if (kind == TCW_KIND_SAME) {
            c->run = 1;
            c->run_pos = pos;
        } else {
            c->run = 0;
        }
        tcw_put_varint(c->buf, c->cap, &pos, item_head);
        if (payload_len)
            memcpy(c->buf + pos, payload, payload_len);
        pos += payload_len;
    }
    c->len = pos;
    c->prev_ts = ts_ms;
    c->count++;
    return TCW_OK;
}

int tcw_cbatch_finish(tcw_cbatch *c, size_t *out_len)
{
    size_t pos;
    if (!c || !c->buf || !c->link || !out_len)
        return TCW_E_ARG;
    if (c->finished || c->count == 0)
        return TCW_E_STATE;
    pos = c->count_pos;
    tcw_put_varint(c->buf, c->cap, &pos, c->count);
    c->finished = 1;
    c->link->have = 1;
    c->link->epoch = c->epoch;
    c->link->last_seq = c->first_seq + c->count - 1;
    c->link->last_ts = c->prev_ts;
    c->link->interval_ms = c->interval_ms;
    *out_len = c->len;
    return TCW_OK;
}

static int get_u8(const uint8_t *msg, size_t len, size_t *pos, uint8_t *v)
{
    if (*pos >= len)
        return TCW_E_TRUNCATED;
    *v = msg[(*pos)++];
    return TCW_OK;
}

static int get_text(const uint8_t *msg, size_t len, size_t *pos, tcw_reply *out)
{
    uint64_t n;
    int rc = tcw_get_varint(msg, len, pos, TCW_MAX_REASON_BYTES, &n);
    if (rc != TCW_OK)
        return rc;
    if (len - *pos < n)
        return TCW_E_TRUNCATED;
    out->reason = msg + *pos;
    out->reason_len = (size_t)n;
    *pos += (size_t)n;
    return TCW_OK;
}

static int get_range(const uint8_t *msg, size_t len, size_t *pos, tcw_reply *out)
{
    int rc;
    if ((rc = tcw_get_varint(msg, len, pos, TCW_MAX_EPOCH, &out->epoch)) != TCW_OK)
        return rc;
    if ((rc = tcw_get_varint(msg, len, pos, TCW_MAX_SEQ, &out->first_seq)) != TCW_OK)
        return rc;
    return tcw_get_varint(msg, len, pos, TCW_MAX_FRAMES_PER_BATCH, &out->count);
}

int tcw_decode_reply(const uint8_t *msg, size_t len, tcw_reply *out)
{
    size_t pos = 0;
    uint8_t type;
    int rc;
    tcw_reply r;
    if (!msg || !out)
        return TCW_E_ARG;
    memset(&r, 0, sizeof(r));
    if ((rc = get_u8(msg, len, &pos, &type)) != TCW_OK)
        return rc;
    r.type = type;
    switch (type) {
    case TCW_WELCOME:
        if ((rc = get_u8(msg, len, &pos, &r.version)) == TCW_OK && r.version >= 3) {
            uint64_t caps;
            if ((rc = tcw_get_varint(msg, len, &pos, 0xFFFFFFFFull, &caps)) == TCW_OK)
                r.capabilities = (uint32_t)caps;
        }
        break;
    case TCW_ACK:
        rc = get_range(msg, len, &pos, &r);
        break;
    case TCW_REJECT:
        if ((rc = get_range(msg, len, &pos, &r)) == TCW_OK && (rc = get_u8(msg, len, &pos, &r.code)) == TCW_OK)
            rc = get_text(msg, len, &pos, &r);
        break;
    case TCW_ERROR:
        if ((rc = get_u8(msg, len, &pos, &r.code)) == TCW_OK)
            rc = get_text(msg, len, &pos, &r);
        break;
    default:
        return TCW_E_TYPE; /* unknown, or HELLO/BATCH which only cameras send */
    }
    if (rc != TCW_OK)
        return rc;
    if (pos != len)
        return TCW_E_TRAILING;
    *out = r;
    return TCW_OK;
}

static uint16_t crc_ccitt(uint16_t crc, const uint8_t *data, size_t len)
{
    size_t i;
    int bit;
    for (i = 0; i < len; i++) {
        crc ^= (uint16_t)(data[i] << 8);
        for (bit = 0; bit < 8; bit++)
            crc = (uint16_t)((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

void tcw_stream_check(const uint8_t *model_tag, size_t tag_len, const uint8_t *payload, size_t payload_len,
                      uint8_t out[TCW_STREAM_CHECK_BYTES])
{
    uint8_t n[4];
    uint16_t crc = 0xFFFF;
    n[0] = (uint8_t)payload_len;
    n[1] = (uint8_t)(payload_len >> 8);
    n[2] = (uint8_t)(payload_len >> 16);
    n[3] = (uint8_t)(payload_len >> 24);
    if (model_tag && tag_len)
        crc = crc_ccitt(crc, model_tag, tag_len);
    crc = crc_ccitt(crc, n, 4);
    if (payload && payload_len)
        crc = crc_ccitt(crc, payload, payload_len);
    crc ^= 0xFFFF;
    out[0] = (uint8_t)crc;
    out[1] = (uint8_t)(crc >> 8);
}
