/* Unit tests of taskcodec_wire in C (expected bytes come from the Python reference, taskcodec/wire.py).
 * Exit status 0 when every check passes; built with -fsanitize=address,undefined by the test suite. */
#include "taskcodec_wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define EXPECT(cond)                                                             \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "test_wire.c:%d: expected %s\n", __LINE__, #cond);   \
            failures++;                                                          \
        }                                                                        \
    } while (0)

static const uint8_t TAG[8] = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef};

static void test_varint(void)
{
    uint8_t buf[10];
    size_t pos = 0;
    uint64_t v;
    static const uint8_t max63[10] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01}; /* 2^63 */
    static const uint8_t big[10] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02};  /* 2^64 */
    static const uint8_t toolong[11] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00};
    EXPECT(tcw_put_varint(buf, sizeof(buf), &pos, 300) == TCW_OK && pos == 2 && buf[0] == 0xac && buf[1] == 0x02);
    pos = 0;
    EXPECT(tcw_put_varint(buf, 1, &pos, 300) == TCW_E_NOSPACE && pos == 0);
    pos = 0;
    EXPECT(tcw_get_varint(max63, 10, &pos, UINT64_MAX, &v) == TCW_OK && v == 9223372036854775808ull && pos == 10);
    pos = 0;
    EXPECT(tcw_get_varint(max63, 10, &pos, TCW_MAX_SEQ, &v) == TCW_E_RANGE && pos == 0);
    pos = 0;
    EXPECT(tcw_get_varint(max63, 10, &pos, TCW_MAX_EPOCH, &v) == TCW_E_RANGE && pos == 0);
    pos = 0;
    EXPECT(tcw_get_varint(big, 10, &pos, TCW_MAX_SEQ, &v) == TCW_E_RANGE);
    pos = 0;
    EXPECT(tcw_get_varint(toolong, 11, &pos, TCW_MAX_SEQ, &v) == TCW_E_VARINT);
    pos = 0;
    EXPECT(tcw_get_varint(max63, 9, &pos, TCW_MAX_SEQ, &v) == TCW_E_TRUNCATED);
    pos = 0;
    EXPECT(tcw_put_varint(buf, sizeof(buf), &pos, UINT64_MAX) == TCW_OK && pos == 10);
}

static void test_hello(void)
{
    /* wire.Hello(bytes.fromhex("0123456789abcdef"), "cam-7", b"secret").encode(): v4, capabilities 0 */
    static const uint8_t expected[] = {0x01, 0x04, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x05, 'c', 'a',
                                       'm', '-', '7', 0x06, 's', 'e', 'c', 'r', 'e', 't', 0x00};
    static const uint8_t rtag[8] = {0x86, 0x11, 0x7e, 0x70, 0x55, 0x88, 0x99, 0x66};
    uint8_t out[64];
    size_t len = 0;
    char longid[256];
    EXPECT(tcw_encode_hello(out, sizeof(out), &len, TAG, "cam-7", 5, (const uint8_t *)"secret", 6) == TCW_OK);
    EXPECT(len == sizeof(expected) && memcmp(out, expected, len) == 0);
    EXPECT(tcw_encode_hello(out, sizeof(expected) - 1, &len, TAG, "cam-7", 5, (const uint8_t *)"secret", 6) ==
           TCW_E_NOSPACE);
    EXPECT(tcw_encode_hello(out, sizeof(out), &len, TAG, "", 0, NULL, 0) == TCW_E_ARG);
    memset(longid, 'x', sizeof(longid));
    EXPECT(tcw_encode_hello(out, sizeof(out), &len, TAG, longid, 256, NULL, 0) == TCW_E_ARG);
    EXPECT(tcw_encode_hello(out, sizeof(out), &len, NULL, "cam", 3, NULL, 0) == TCW_E_ARG);
    /* v3 temporal: capabilities 1 then the residual tag */
    EXPECT(tcw_encode_hello_caps(out, sizeof(out), &len, TAG, "cam-7", 5, (const uint8_t *)"secret", 6,
                                 TCW_CAP_TEMPORAL, rtag) == TCW_OK);
    EXPECT(len == sizeof(expected) + 8 && memcmp(out, expected, sizeof(expected) - 1) == 0 &&
           out[sizeof(expected) - 1] == 0x01 && memcmp(out + sizeof(expected), rtag, 8) == 0);
    EXPECT(tcw_encode_hello_caps(out, sizeof(expected) + 7, &len, TAG, "cam-7", 5, (const uint8_t *)"secret", 6,
                                 TCW_CAP_TEMPORAL, rtag) == TCW_E_NOSPACE);
    EXPECT(tcw_encode_hello_caps(out, sizeof(out), &len, TAG, "cam-7", 5, NULL, 0, TCW_CAP_TEMPORAL, NULL) ==
           TCW_E_ARG);
}

static void test_tbatch(void)
{
    /* wire.TemporalBatch(5, [Frame(100, 1000, b"abc", KEY), Frame(101, 1200, b"", SAME),
     *                        Frame(102, 1400, b"d", COND)]).encode(): lengths 3 << 2 | 0, 0 << 2 | 2, 1 << 2 | 1 */
    static const uint8_t expected[] = {0x07, 0x05, 0x64, 0x03, 0xd0, 0x0f, 0x00, 0x0c, 'a', 'b', 'c',
                                       0x90, 0x03, 0x02, 0x90, 0x03, 0x05, 'd'};
    uint8_t out[64];
    size_t len = 0;
    tcw_batch b;
    EXPECT(tcw_batch_begin_temporal(&b, out, sizeof(out), 5, 100) == TCW_OK);
    EXPECT(tcw_batch_add_kind(&b, 1000, TCW_KIND_KEY, (const uint8_t *)"abc", 3) == TCW_OK);
    EXPECT(tcw_batch_add_kind(&b, 1200, TCW_KIND_SAME, (const uint8_t *)"x", 1) == TCW_E_ARG); /* SAME: no payload */
    EXPECT(tcw_batch_add_kind(&b, 1200, 3, NULL, 0) == TCW_E_ARG);                          /* kind 3 */
    EXPECT(tcw_batch_add_kind(&b, 1200, TCW_KIND_SAME, NULL, 0) == TCW_OK);
    EXPECT(tcw_batch_add_kind(&b, 1400, TCW_KIND_COND, (const uint8_t *)"d", 1) == TCW_OK);
    EXPECT(tcw_batch_finish(&b, &len) == TCW_OK);
    EXPECT(len == sizeof(expected) && memcmp(out, expected, len) == 0);
    EXPECT(tcw_batch_begin(&b, out, sizeof(out), 5, 100) == TCW_OK); /* a plain BATCH carries KEY frames only */
    EXPECT(tcw_batch_add_kind(&b, 1000, TCW_KIND_COND, (const uint8_t *)"d", 1) == TCW_E_ARG);
}

static void test_batch(void)
{
    /* wire.Batch(5, [Frame(100, 1000, b"abc"), Frame(101, 1200, b"de")]).encode(): base zigzag(1000) = 2000,
     * delta zigzag(200) = 400 */
    static const uint8_t expected[] = {0x02, 0x05, 0x64, 0x02, 0xd0, 0x0f, 0x00, 0x03, 'a', 'b',
                                       'c',  0x90, 0x03, 0x02, 'd',  'e'};
    /* the same with frame 101 captured one year (31536000000 ms) before frame 100: delta -31536000200 */
    static const uint8_t back[] = {0x02, 0x05, 0x64, 0x02, 0xd0, 0x0f, 0x00, 0x03, 'a', 'b',
                                   'c',  0xff, 0xaf, 0x89, 0xfb, 0xea, 0x01, 0x02, 'd', 'e'};
    tcw_frame stepped[2] = {{1000, (const uint8_t *)"abc", 3}, {1000 - 31536000000ll, (const uint8_t *)"de", 2}};
    static uint8_t big[TCW_MAX_FRAMES_PER_BATCH * 3 + 64];
    uint8_t out[64];
    size_t len = 0, i;
    tcw_batch b;
    tcw_frame frames[2] = {{1000, (const uint8_t *)"abc", 3}, {1200, (const uint8_t *)"de", 2}};
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, 5, 100, frames, 2) == TCW_OK);
    EXPECT(len == sizeof(expected) && memcmp(out, expected, len) == 0);
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, 5, 100, frames, 0) == TCW_E_ARG);
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, TCW_MAX_EPOCH + 1, 100, frames, 2) == TCW_E_ARG);
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, TCW_MAX_EPOCH, 100, frames, 2) == TCW_OK);
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, 5, TCW_MAX_SEQ, frames, 2) == TCW_E_ARG); /* seq 2^63 */
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, 5, 100, stepped, 2) == TCW_OK);
    EXPECT(len == sizeof(back) && memcmp(out, back, len) == 0);
    stepped[1].ts_ms = -TCW_MAX_ABS_TS_MS - 1;
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, 5, 100, stepped, 2) == TCW_E_ARG);
    stepped[0].ts_ms = TCW_MAX_ABS_TS_MS;
    stepped[1].ts_ms = -TCW_MAX_ABS_TS_MS; /* the largest step the format allows */
    EXPECT(tcw_encode_batch(out, sizeof(out), &len, 5, 100, stepped, 2) == TCW_OK);
    EXPECT(tcw_unzigzag(tcw_zigzag(-TCW_MAX_ABS_TS_MS * 2)) == -TCW_MAX_ABS_TS_MS * 2);
    EXPECT(tcw_zigzag(-1) == 1 && tcw_zigzag(1) == 2 && tcw_unzigzag(3) == -2);

    /* A frame that does not fit leaves the batch intact; it can still be finished. */
    EXPECT(tcw_batch_begin(&b, out, 14, 5, 100) == TCW_OK);
    EXPECT(tcw_batch_finish(&b, &len) == TCW_E_STATE);
    EXPECT(tcw_batch_add(&b, 1000, (const uint8_t *)"abc", 3) == TCW_OK);
    EXPECT(tcw_batch_add(&b, 1200, (const uint8_t *)"de", 2) == TCW_E_NOSPACE);
    EXPECT(tcw_batch_finish(&b, &len) == TCW_OK && len == 11 && memcmp(out, expected, 3) == 0 && out[3] == 1 &&
           memcmp(out + 4, expected + 4, 7) == 0);
    EXPECT(tcw_batch_add(&b, 1200, (const uint8_t *)"de", 2) == TCW_E_STATE);
    EXPECT(tcw_batch_finish(&b, &len) == TCW_E_STATE);

    /* Too large payload, a timestamp going backwards (delta -1 -> 0x01), and 4096 frames with a 2-byte count. */
    EXPECT(tcw_batch_begin(&b, big, sizeof(big), 1, 0) == TCW_OK);
    EXPECT(tcw_batch_add(&b, 10, big, TCW_MAX_FRAME_BYTES + 1) == TCW_E_ARG);
    for (i = 0; i < TCW_MAX_FRAMES_PER_BATCH; i++)
        EXPECT(tcw_batch_add(&b, 100 - (i % 2), NULL, 0) == TCW_OK);
    EXPECT(tcw_batch_add(&b, 100, NULL, 0) == TCW_E_STATE);
    EXPECT(tcw_batch_finish(&b, &len) == TCW_OK);
    EXPECT(len == 1 + 1 + 1 + 2 + 2 + 2 * TCW_MAX_FRAMES_PER_BATCH);
    EXPECT(big[3] == 0x80 && big[4] == 0x20 && big[5] == 0xc8 && big[6] == 0x01 && big[7] == 0 && big[9] == 1 &&
           big[11] == 2);
}

static void test_replies(void)
{
    /* wire.Reject(5, 100, 1, Code.BAD_PAYLOAD, "stream check failed").encode() and friends */
    static const uint8_t reject[] = {0x04, 0x05, 0x64, 0x01, 0x04, 0x13, 's', 't', 'r', 'e', 'a', 'm', ' ', 'c',
                                     'h',  'e',  'c',  'k',  ' ',  'f',  'a', 'i', 'l', 'e', 'd'};
    static const uint8_t ack[] = {0x03, 0x05, 0x64, 0x32};
    static const uint8_t welcome[] = {0x06, 0x01};
    static const uint8_t error[] = {0x05, 0x02, 0x00};
    static const uint8_t hello[] = {0x01, 0x01};
    static const uint8_t welcome3[] = {0x06, 0x03, 0x01};
    static const uint8_t welcome3_short[] = {0x06, 0x03};
    static const uint8_t ack_big_count[] = {0x03, 0x05, 0x64, 0x81, 0x20}; /* 4097 frames */
    static const uint8_t long_reason[] = {0x05, 0x02, 0x81, 0x08};         /* reason of 1025 bytes */
    uint8_t ack_trailing[5];
    tcw_reply r;
    EXPECT(tcw_decode_reply(reject, sizeof(reject), &r) == TCW_OK);
    EXPECT(r.type == TCW_REJECT && r.epoch == 5 && r.first_seq == 100 && r.count == 1);
    EXPECT(r.code == TCW_CODE_BAD_PAYLOAD && r.reason_len == 19 && memcmp(r.reason, "stream check failed", 19) == 0);
    EXPECT(tcw_decode_reply(ack, sizeof(ack), &r) == TCW_OK && r.type == TCW_ACK && r.count == 50);
    EXPECT(tcw_decode_reply(welcome, sizeof(welcome), &r) == TCW_OK && r.type == TCW_WELCOME && r.version == 1);
    EXPECT(tcw_decode_reply(error, sizeof(error), &r) == TCW_OK && r.code == 2 && r.reason_len == 0);
    EXPECT(tcw_decode_reply(welcome3, sizeof(welcome3), &r) == TCW_OK && r.version == 3 &&
           r.capabilities == TCW_CAP_TEMPORAL);
    EXPECT(tcw_decode_reply(welcome3_short, sizeof(welcome3_short), &r) == TCW_E_TRUNCATED);
    EXPECT(tcw_decode_reply(hello, sizeof(hello), &r) == TCW_E_TYPE);
    EXPECT(tcw_decode_reply(ack, 3, &r) == TCW_E_TRUNCATED);
    EXPECT(tcw_decode_reply(ack, 0, &r) == TCW_E_TRUNCATED);
    memcpy(ack_trailing, ack, 4);
    ack_trailing[4] = 0;
    EXPECT(tcw_decode_reply(ack_trailing, 5, &r) == TCW_E_TRAILING);
    EXPECT(tcw_decode_reply(ack_big_count, sizeof(ack_big_count), &r) == TCW_E_RANGE);
    EXPECT(tcw_decode_reply(long_reason, sizeof(long_reason), &r) == TCW_E_RANGE);
    EXPECT(tcw_decode_reply(reject, sizeof(reject) - 1, &r) == TCW_E_TRUNCATED);
    EXPECT(tcw_decode_reply(NULL, 0, &r) == TCW_E_ARG);
}

static void test_stream_check(void)
{
    /* taskcodec.coding.stream._check(bytes.fromhex("0123456789abcdef"), bytes([1, 2, 3, 4])) == b"\x4b\xdb" */
    static const uint8_t payload[] = {1, 2, 3, 4};
    uint8_t check[2];
    tcw_stream_check(TAG, sizeof(TAG), payload, sizeof(payload), check);
    EXPECT(check[0] == 0x4b && check[1] == 0xdb);
}

int main(void)
{
    test_varint();
    test_hello();
    test_tbatch();
    test_batch();
    test_replies();
    test_stream_check();
    EXPECT(strcmp(tcw_strerror(TCW_E_NOSPACE), "output buffer too small") == 0);
    if (failures) {
        fprintf(stderr, "test_wire: %d failure(s)\n", failures);
        return 1;
    }
    puts("test_wire: all checks passed");
    return 0;
}
