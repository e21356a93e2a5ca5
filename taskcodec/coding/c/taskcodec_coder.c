/* taskcodec-range56: see taskcodec_coder.h and docs/wire-format.md. */
#include "taskcodec_coder.h"

#include <string.h>

#define TOP (1ull << 56) /* the window: low and range live in [0, 2^56] (+ one carry bit for low) */
#define BOT (1ull << 48) /* renormalise (shift out one byte) while range < 2^48 */
#define HALF_BITS 16u    /* escaped values: two uniform 16-bit halves */

const char *tcc_strerror(int status)
{
    switch (status) {
    case TCC_OK: return "ok";
    case TCC_E_ARG: return "invalid argument";
    case TCC_E_NOSPACE: return "output buffer too small";
    case TCC_E_TABLES: return "invalid entropy tables";
    case TCC_E_CHECK: return "stream check failed";
    case TCC_E_DATA: return "undecodable stream";
    case TCC_E_BLOB: return "invalid tables blob";
    default: return "unknown error";
    }
}

int tcc_tables_check(const tcc_tables *t)
{
    uint32_t d, i;
    if (!t || !t->lower || !t->length || !t->cdf)
        return TCC_E_ARG;
    if (t->dim < 1 || t->dim > TCC_MAX_DIM || t->precision < 1 || t->precision > TCC_MAX_PRECISION || t->stride < 2)
        return TCC_E_TABLES;
    for (d = 0; d < t->dim; d++) {
        const uint32_t *row = t->cdf + (size_t)d * t->stride;
        uint32_t n = t->length[d] + 1; /* entries: support + escape */
        if (t->length[d] < 1 || t->length[d] > t->stride - 2 || n > (1u << t->precision))
            return TCC_E_TABLES;
        if ((int64_t)t->lower[d] + (int64_t)t->length[d] - 1 > INT32_MAX)
            return TCC_E_TABLES;
        if (row[0] != 0 || row[n] != (1u << t->precision))
            return TCC_E_TABLES;
        for (i = 0; i < n; i++)
            if (row[i + 1] <= row[i])
                return TCC_E_TABLES;
    }
    return TCC_OK;
}

size_t tcc_max_bytes(const tcc_tables *t)
{
    /* each coded symbol narrows the range by less than 2^(P+1) (2^17 per half): at most P+1 bits per dimension plus
     * 2 * 17 for an escape, plus the 7-byte window and a byte of slack */
    return ((size_t)t->dim * (t->precision + 1 + 2 * (HALF_BITS + 1)) + 7) / 8 + 8;
}

/* ---- encoder ------------------------------------------------------------------------------------------------- */

typedef struct {
    uint64_t low;     /* < 2^57: the 56-bit window plus a carry bit */
    uint64_t range;   /* in [1, 2^56] */
    uint64_t pending; /* 0xFF bytes waiting behind the cached byte (a carry turns them into 0x00) */
    uint8_t cache;    /* the last settled byte not yet written (a carry may still increment it) */
    int has_cache;    /* 0 until the first byte leaves the window (the virtual byte before it is never written) */
    uint8_t *out;
    size_t cap, len;
    size_t zeros; /* zero bytes not written yet: written before the next non-zero byte, dropped at the end */
    int err;
} enc_state;

static void put(enc_state *e, uint8_t b)
{
    if (b == 0) {
        e->zeros++;
        return;
    }
    for (; e->zeros; e->zeros--) {
        if (e->len < e->cap)
            e->out[e->len++] = 0;
        else
            e->err = TCC_E_NOSPACE;
    }
    if (e->len < e->cap)
        e->out[e->len++] = b;
    else
        e->err = TCC_E_NOSPACE;
}

static void shift_low(enc_state *e)
{
    if (e->low < (0xFFull << 48) || e->low >= TOP) {
        uint8_t carry = (uint8_t)(e->low >> 56);
        if (e->has_cache)
            put(e, (uint8_t)(e->cache + carry));
        /* (without a cached byte a carry cannot happen: every interval lies inside the first window) */
        for (; e->pending; e->pending--)
            put(e, (uint8_t)(0xFF + carry));
        e->cache = (uint8_t)(e->low >> 48);
        e->has_cache = 1;
    } else {
        e->pending++;
    }
    e->low = (e->low & (BOT - 1)) << 8;
}

static void enc_put(enc_state *e, uint32_t cum, uint32_t freq, uint32_t bits)
{
    uint64_t r = e->range >> bits;
    e->low += r * cum;
    e->range = r * freq;
    while (e->range < BOT) {
        e->range <<= 8;
        shift_low(e);
    }
}

static uint32_t zigzag(int32_t v)
{
    return ((uint32_t)v << 1) ^ (uint32_t)(v < 0 ? 0xFFFFFFFFu : 0u);
}

static int32_t unzigzag(uint32_t u)
{
    uint32_t v = (u >> 1) ^ (0u - (u & 1u));
    return v <= (uint32_t)INT32_MAX ? (int32_t)v : (int32_t)(-(int64_t)(~v) - 1);
}

int tcc_encode(const tcc_tables *t, const int32_t *symbols, uint8_t *out, size_t cap, size_t *out_len)
{
    enc_state e;
    uint32_t d;
    int s;
    uint64_t hi;
    if (!t || !symbols || !out_len || (!out && cap))
        return TCC_E_ARG;
    memset(&e, 0, sizeof e);
    e.range = TOP;
    e.out = out;
    e.cap = cap;
    for (d = 0; d < t->dim; d++) {
        const uint32_t *row = t->cdf + (size_t)d * t->stride;
        int64_t off = (int64_t)symbols[d] - (int64_t)t->lower[d];
        if (off >= 0 && off < (int64_t)t->length[d]) {
            enc_put(&e, row[off], row[off + 1] - row[off], t->precision);
        } else {
            uint32_t esc = t->length[d], z = zigzag(symbols[d]);
            enc_put(&e, row[esc], row[esc + 1] - row[esc], t->precision);
            enc_put(&e, z >> HALF_BITS, 1, HALF_BITS);
            enc_put(&e, z & 0xFFFFu, 1, HALF_BITS);
        }
    }
    /* termination: the point of [low, low + range) with the most trailing zero bits (whole bytes) */
    hi = e.low + e.range; /* exclusive, < 2^57 */
    for (s = 56; s >= 0; s -= 8) {
        uint64_t mask = (1ull << s) - 1;
        uint64_t v = (e.low + mask) & ~mask;
        if (v >= e.low && v < hi) {
            e.low = v;
            break;
        }
    }
    for (d = 0; d < 8; d++) /* push the whole window (and the carry) through the cache */
        shift_low(&e);
    if (e.err)
        return e.err;
    *out_len = e.len; /* without the trailing zeros (e.zeros): a decoder pads with zeros */
    return TCC_OK;
}

/* ---- decoder ------------------------------------------------------------------------------------------------- */

typedef struct {
    uint64_t code;  /* value - low, < range */
    uint64_t range;
    const uint8_t *in;
    size_t len, pos; /* pos may run past len: missing bytes read as zero */
} dec_state;

static uint8_t next_byte(dec_state *s)
{
    uint8_t b = s->pos < s->len ? s->in[s->pos] : 0;
    s->pos++;
    return b;
}

static void dec_narrow(dec_state *s, uint64_t r, uint32_t cum, uint32_t freq)
{
    s->code -= r * cum;
    s->range = r * freq;
    while (s->range < BOT) {
        s->range <<= 8;
        s->code = (s->code << 8) | next_byte(s);
    }
}

/* The entry of a row with row[k] <= q < row[k + 1], k in [0, n). */
static uint32_t find(const uint32_t *row, uint32_t n, uint32_t q)
{
    uint32_t lo = 0, hi = n; /* row[lo] <= q < row[hi] */
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (row[mid] <= q)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

static int dec_half(dec_state *s, uint32_t *half)
{
    uint64_t r = s->range >> HALF_BITS, q = s->code / r;
    if (q >> HALF_BITS)
        return TCC_E_DATA; /* the sliver of the range no symbol owns */
    *half = (uint32_t)q;
    dec_narrow(s, r, (uint32_t)q, 1);
    return TCC_OK;
}

int tcc_decode(const tcc_tables *t, const uint8_t *in, size_t len, int32_t *symbols)
{
    dec_state s;
    uint32_t d, i;
    if (!t || !symbols || (!in && len))
        return TCC_E_ARG;
    s.in = in;
    s.len = len;
    s.pos = 0;
    s.code = 0;
    s.range = TOP;
    for (i = 0; i < 7; i++)
        s.code = (s.code << 8) | next_byte(&s);
    for (d = 0; d < t->dim; d++) {
        const uint32_t *row = t->cdf + (size_t)d * t->stride;
        uint32_t n = t->length[d] + 1, k;
        uint64_t r = s.range >> t->precision, q = s.code / r;
        if (q >= (1ull << t->precision))
            return TCC_E_DATA;
        k = find(row, n, (uint32_t)q);
        dec_narrow(&s, r, row[k], row[k + 1] - row[k]);
        if (k < t->length[d]) {
            symbols[d] = (int32_t)((int64_t)t->lower[d] + k);
        } else {
            uint32_t h, l;
            int64_t off;
            if (dec_half(&s, &h) || dec_half(&s, &l))
                return TCC_E_DATA;
            symbols[d] = unzigzag((h << HALF_BITS) | l);
            off = (int64_t)symbols[d] - (int64_t)t->lower[d];
            if (off >= 0 && off < (int64_t)t->length[d])
                return TCC_E_DATA; /* an escape for a value inside the support: no encoder writes that */
        }
    }
    /* the encoder writes exactly the bytes the decoder reads, minus trailing zeros */
    if (len > s.pos || (len && in[len - 1] == 0))
        return TCC_E_DATA;
    return TCC_OK;
}

/* ---- payload: check || bytes --------------------------------------------------------------------------------- */

static uint16_t crc_ccitt(uint16_t crc, const uint8_t *p, size_t n)
{
    size_t i;
    int b;
    for (i = 0; i < n; i++) {
        crc ^= (uint16_t)((uint16_t)p[i] << 8);
        for (b = 0; b < 8; b++)
            crc = (uint16_t)((crc & 0x8000u) ? (((unsigned)crc << 1) ^ 0x1021u) : ((unsigned)crc << 1));
    }
    return crc;
}

void tcc_check(const uint8_t *model_tag, size_t tag_len, const uint8_t *bytes, size_t n, uint8_t out[TCC_CHECK_BYTES])
{
    uint8_t le[4];
    uint16_t crc = 0xFFFF;
    le[0] = (uint8_t)n;
    le[1] = (uint8_t)(n >> 8);
    le[2] = (uint8_t)(n >> 16);
    le[3] = (uint8_t)(n >> 24);
    if (model_tag && tag_len)
        crc = crc_ccitt(crc, model_tag, tag_len);
    crc = crc_ccitt(crc, le, 4);
    if (bytes && n)
        crc = crc_ccitt(crc, bytes, n);
    crc ^= 0xFFFF;
    out[0] = (uint8_t)crc;
    out[1] = (uint8_t)(crc >> 8);
}

int tcc_payload_encode(const tcc_tables *t, const int32_t *symbols, const uint8_t *model_tag, size_t tag_len,
                       uint8_t *out, size_t cap, size_t *out_len)
{
    size_t n = 0;
    int rc;
    if (!out || !out_len || (!model_tag && tag_len))
        return TCC_E_ARG;
    if (cap < TCC_CHECK_BYTES)
        return TCC_E_NOSPACE;
    rc = tcc_encode(t, symbols, out + TCC_CHECK_BYTES, cap - TCC_CHECK_BYTES, &n);
    if (rc)
        return rc;
    tcc_check(model_tag, tag_len, out + TCC_CHECK_BYTES, n, out);
    *out_len = n + TCC_CHECK_BYTES;
    return TCC_OK;
}

int tcc_payload_decode(const tcc_tables *t, const uint8_t *payload, size_t len, const uint8_t *model_tag,
                       size_t tag_len, int32_t *symbols)
{
    uint8_t check[TCC_CHECK_BYTES];
    if (!t || !symbols || (!payload && len) || (!model_tag && tag_len))
        return TCC_E_ARG;
    if (len < TCC_CHECK_BYTES)
        return TCC_E_CHECK;
    tcc_check(model_tag, tag_len, payload + TCC_CHECK_BYTES, len - TCC_CHECK_BYTES, check);
    if (check[0] != payload[0] || check[1] != payload[1])
        return TCC_E_CHECK;
    return tcc_decode(t, payload + TCC_CHECK_BYTES, len - TCC_CHECK_BYTES, symbols);
}

/* ---- tables blob ----------------------------------------------------------------------------------------------- */

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

int tcc_blob_words(const uint8_t *blob, size_t len, size_t *words)
{
    uint32_t dim, stride;
    uint64_t w;
    if (!blob || !words)
        return TCC_E_ARG;
    if (len < TCC_BLOB_HEADER_BYTES || memcmp(blob, TCC_BLOB_MAGIC, 4) != 0 || blob[4] != TCC_BLOB_VERSION ||
        blob[6] != 0 || blob[7] != 0)
        return TCC_E_BLOB;
    dim = le32(blob + 8);
    stride = le32(blob + 12);
    if (dim < 1 || dim > TCC_MAX_DIM || stride < 2 || stride > (1u << 20))
        return TCC_E_BLOB;
    w = 2ull * dim + (uint64_t)dim * stride;
    if ((uint64_t)len != TCC_BLOB_HEADER_BYTES + 4 * w)
        return TCC_E_BLOB;
    *words = (size_t)w;
    return TCC_OK;
}

int tcc_blob_load(const uint8_t *blob, size_t len, uint32_t *work, size_t work_words, tcc_tables *t)
{
    size_t words, i;
    int rc = tcc_blob_words(blob, len, &words);
    if (rc)
        return rc;
    if (!work || !t)
        return TCC_E_ARG;
    if (work_words < words)
        return TCC_E_NOSPACE;
    for (i = 0; i < words; i++)
        work[i] = le32(blob + TCC_BLOB_HEADER_BYTES + 4 * i);
    t->precision = blob[5];
    t->dim = le32(blob + 8);
    t->stride = le32(blob + 12);
    t->lower = (const int32_t *)(const void *)work; /* int32 and uint32 share representation (C99 6.2.5) */
    t->length = work + t->dim;
    t->cdf = work + 2 * (size_t)t->dim;
    return tcc_tables_check(t);
}
