/* Fuzz harness for taskcodec_wire. With clang: -fsanitize=fuzzer,address,undefined -DTCW_LIBFUZZER (libFuzzer
 * drives LLVMFuzzerTestOneInput). Without it, main() runs a deterministic random-mutation loop over valid seed
 * messages: fuzz_wire [ITERATIONS [SEED [MAX_SECONDS]]]. Invariant violations abort; memory errors are the
 * sanitizers' job. Every input is passed in an exactly sized heap block so that over-reads are caught. */
#include "taskcodec_wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_wire: invariant failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

static unsigned long long accepted[8];

static void fuzz_reply(const uint8_t *data, size_t size)
{
    tcw_reply r;
    int rc = tcw_decode_reply(data, size, &r);
    if (rc != TCW_OK) {
        CHECK(rc < 0 && rc >= TCW_E_STATE);
        return;
    }
    CHECK(r.type == TCW_WELCOME || r.type == TCW_ACK || r.type == TCW_REJECT || r.type == TCW_ERROR);
    CHECK(r.epoch <= TCW_MAX_EPOCH && r.first_seq <= TCW_MAX_SEQ && r.count <= TCW_MAX_FRAMES_PER_BATCH);
    CHECK(r.reason_len <= TCW_MAX_REASON_BYTES);
    if (r.reason_len) {
        CHECK(r.reason >= data && r.reason + r.reason_len <= data + size);
        CHECK(r.reason + r.reason_len == data + size); /* the reason is always the last field */
    }
    accepted[r.type]++;
}

static void fuzz_varint(const uint8_t *data, size_t size)
{
    size_t pos = 0, pos2 = 0;
    uint64_t v, v2;
    uint8_t buf[TCW_MAX_VARINT_BYTES];
    if (tcw_get_varint(data, size, &pos, TCW_MAX_SEQ, &v) != TCW_OK)
        return;
    CHECK(pos >= 1 && pos <= size && pos <= TCW_MAX_VARINT_BYTES);
    CHECK(tcw_put_varint(buf, sizeof(buf), &pos2, v) == TCW_OK && pos2 <= pos);
    pos = 0;
    CHECK(tcw_get_varint(buf, pos2, &pos, TCW_MAX_SEQ, &v2) == TCW_OK && v2 == v && pos == pos2);
}

static uint64_t read_u64(const uint8_t *data, size_t size, size_t at)
{
    uint64_t v = 0;
    size_t i;
    for (i = 0; i < 8 && at + i < size; i++)
        v |= (uint64_t)data[at + i] << (8 * i);
    return v;
}

static int same_link(const tcw_link *a, const tcw_link *b)
{
    return a->have == b->have && a->epoch == b->epoch && a->last_seq == b->last_seq && a->last_ts == b->last_ts &&
           a->interval_ms == b->interval_ms;
}

/* Encoders: fields and buffer sizes come from the input; outputs must respect the caller's capacity and agree
 * between a tight buffer and a roomy one. */
static void fuzz_encoders(const uint8_t *data, size_t size)
{
    static uint8_t roomy[1 << 16];
    uint8_t *tight;
    size_t cap, len = 0, len2 = 0, n, i, off;
    tcw_frame frames[16];
    int rc, rc2;
    if (size < 12)
        return;
    cap = data[0] | (size_t)(data[1] & 0x3) << 8;
    tight = malloc(cap ? cap : 1);
    CHECK(tight != NULL);

    /* HELLO: tag = bytes 2..9, camera id and token are slices of the rest */
    n = size - 10;
    rc = tcw_encode_hello(tight, cap, &len, data + 2, (const char *)data + 10, n / 2, data + 10 + n / 2, n - n / 2);
    rc2 = tcw_encode_hello(roomy, sizeof(roomy), &len2, data + 2, (const char *)data + 10, n / 2,
                           data + 10 + n / 2, n - n / 2);
    if (rc == TCW_OK) {
        CHECK(rc2 == TCW_OK && len == len2 && len <= cap && memcmp(tight, roomy, len) == 0);
        CHECK(tight[0] == TCW_HELLO && tight[1] == TCW_VERSION);
    } else {
        CHECK(rc == rc2 || (rc == TCW_E_NOSPACE && rc2 == TCW_OK));
    }

    /* BATCH: up to 16 frames over slices of the input, timestamps from the input (sometimes going backwards) */
    n = data[2] % 17;
    off = 12;
    for (i = 0; i < n; i++) {
        size_t plen = off < size ? data[off] % 40 : 0;
        if (off + plen > size)
            plen = off < size ? size - off : 0;
        {
            uint64_t t = read_u64(data, size, 3 + i % 5) >> (data[3] % 64);
            frames[i].ts_ms = (int64_t)(data[4] & 1 ? 0 - t : t); /* negative times and steps too */
        }
        frames[i].payload = off < size ? data + off : data;
        frames[i].len = plen;
        off += plen;
    }
    rc = tcw_encode_batch(tight, cap, &len, read_u64(data, size, 4) >> (data[5] % 64), data[6], frames, n);
    rc2 = tcw_encode_batch(roomy, sizeof(roomy), &len2, read_u64(data, size, 4) >> (data[5] % 64), data[6], frames, n);
    if (rc == TCW_OK) {
        CHECK(rc2 == TCW_OK && len == len2 && len <= cap && memcmp(tight, roomy, len) == 0 && tight[0] == TCW_BATCH);
    } else {
        CHECK(rc == rc2 || rc == TCW_E_NOSPACE); /* a tight buffer may run out before a bad frame is seen */
    }

    /* CBATCH (v4): the same frames with kinds, after a link taken from the input; a tight and a roomy buffer agree,
     * and only a finished CBATCH moves the link */
    {
        tcw_link l1, l2, before;
        tcw_cbatch c1, c2;
        uint64_t epoch = read_u64(data, size, 4) >> (data[5] % 64);
        uint32_t interval = (uint32_t)(read_u64(data, size, 7) >> (data[8] % 64));
        int rc1b, rc2b;
        tcw_link_reset(&l1);
        if (data[9] & 1) {
            l1.have = 1;
            l1.epoch = data[9] & 2 ? epoch : epoch / 3;
            l1.last_seq = data[10] & 1 ? (uint64_t)data[6] - 1 : data[10];
            l1.last_ts = n ? frames[0].ts_ms - (int64_t)(data[11] % 4) : 0;
            l1.interval_ms = data[11] & 4 ? interval : 200;
        }
        l2 = before = l1;
        rc1b = tcw_cbatch_begin(&c1, tight, cap, &l1, epoch, data[6], interval);
        rc2b = tcw_cbatch_begin(&c2, roomy, sizeof(roomy), &l2, epoch, data[6], interval);
        CHECK(rc1b == rc2b);
        for (i = 0; rc1b == TCW_OK && i < n; i++) {
            unsigned kind = (data[(11 + i) % size] >> 2) % 3;
            size_t plen = kind == TCW_KIND_SAME ? 0 : frames[i].len;
            rc = tcw_cbatch_add(&c1, frames[i].ts_ms, kind, frames[i].payload, plen);
            rc2 = tcw_cbatch_add(&c2, frames[i].ts_ms, kind, frames[i].payload, plen);
            CHECK(rc == rc2 || rc == TCW_E_NOSPACE);
            if (rc2 != TCW_OK)
                break;
            if (rc != TCW_OK)
                rc1b = rc; /* the tight one stops; the roomy one goes on */
        }
        if (rc1b == TCW_OK && i == n) {
            rc = tcw_cbatch_finish(&c1, &len);
            rc2 = tcw_cbatch_finish(&c2, &len2);
            CHECK(rc == rc2);
            if (rc == TCW_OK)
                CHECK(len == len2 && len <= cap && memcmp(tight, roomy, len) == 0 && tight[0] == TCW_CBATCH &&
                      l1.have && same_link(&l1, &l2));
            else
                CHECK(same_link(&l1, &before));
        } else {
            CHECK(same_link(&l1, &before));
        }
    }
    free(tight);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_reply(data, size);
    fuzz_varint(data, size);
    fuzz_encoders(data, size);
    return 0;
}

#ifndef TCW_LIBFUZZER
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void)
{
    /* xorshift64*: deterministic for a given seed, so a failure can be replayed */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

int main(int argc, char **argv)
{
    static const uint8_t seeds[][24] = {
        {0x06, 0x01},                                                   /* WELCOME v1 */
        {0x03, 0x05, 0x64, 0x32},                                       /* ACK epoch 5, seq 100, 50 frames */
        {0x03, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x80, 0x80, 0x01, 0x80, 0x20}, /* ACK with multi-byte varints */
        {0x04, 0x05, 0x64, 0x01, 0x04, 0x06, 's', 't', 'r', 'e', 'a', 'm'}, /* REJECT BAD_PAYLOAD "stream" */
        {0x05, 0x03, 0x05, 'm', 'o', 'd', 'e', 'l'},                    /* ERROR UNKNOWN_MODEL "model" */
        {0x02, 0x05, 0x64, 0x02, 0xe8, 0x07, 0x00, 0x03, 'a', 'b', 'c', 0xc8, 0x01, 0x02, 'd', 'e'}, /* BATCH */
    };
    static const size_t seed_len[] = {2, 4, 11, 12, 8, 16};
    unsigned long long iterations = argc > 1 ? strtoull(argv[1], NULL, 10) : 200000ull, it;
    double max_seconds = argc > 3 ? atof(argv[3]) : 0.0;
    clock_t start = clock();
    uint8_t work[96];
    if (argc > 2)
        rng_state ^= strtoull(argv[2], NULL, 10) * 0xD1B54A32D192ED03ull;
    if (rng_state == 0)
        rng_state = 1;
    for (it = 0; it < iterations; it++) {
        size_t len, k, edits;
        uint8_t *exact;
        if (rnd() % 4 == 0) {
            len = rnd() % sizeof(work);
            for (k = 0; k < len; k++)
                work[k] = (uint8_t)rnd();
        } else {
            size_t s = rnd() % (sizeof(seed_len) / sizeof(seed_len[0]));
            len = seed_len[s];
            memcpy(work, seeds[s], len);
        }
        edits = 1 + rnd() % 4;
        for (k = 0; k < edits; k++) {
            switch (rnd() % 5) {
            case 0: /* overwrite a byte */
                if (len)
                    work[rnd() % len] = (uint8_t)rnd();
                break;
            case 1: /* flip a bit */
                if (len)
                    work[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
                break;
            case 2: /* truncate */
                if (len)
                    len = rnd() % len;
                break;
            case 3: /* append random bytes */
                while (len < sizeof(work) && rnd() % 3)
                    work[len++] = (uint8_t)rnd();
                break;
            default: /* interesting values */
                if (len)
                    work[rnd() % len] = (uint8_t[]){0x00, 0x7f, 0x80, 0xff, 0x01}[rnd() % 5];
            }
        }
        exact = malloc(len ? len : 1);
        if (!exact)
            return 2;
        memcpy(exact, work, len);
        LLVMFuzzerTestOneInput(exact, len);
        free(exact);
        if (max_seconds > 0 && (it & 1023) == 0 && (double)(clock() - start) / CLOCKS_PER_SEC > max_seconds) {
            it++;
            break;
        }
    }
    printf("fuzz_wire: %llu inputs, accepted welcome=%llu ack=%llu reject=%llu error=%llu\n", it,
           accepted[TCW_WELCOME], accepted[TCW_ACK], accepted[TCW_REJECT], accepted[TCW_ERROR]);
    return 0;
}
#endif
