/* C unit tests of the entropy coder (taskcodec_coder.h): round trips with escapes, termination, refusal of bad
 * bytes and bad tables, the tables blob. Prints "all checks passed" and exits 0. */
#include "taskcodec_coder.h"

#include <stdio.h>
#include <string.h>

static int failures;
#define CHECK(cond)                                                                                                  \
    do {                                                                                                             \
        if (!(cond)) {                                                                                               \
            printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                                   \
            failures++;                                                                                              \
        }                                                                                                            \
    } while (0)

#define DIM 6
#define STRIDE 6
static const int32_t lower[DIM] = {-2, -2, 0, -1, 5, -1000};
static const uint32_t length[DIM] = {4, 4, 1, 3, 2, 4};
static const uint32_t cdf[DIM * STRIDE] = {
    0, 1000, 40000, 60000, 65000, 65536, /* -2..1, escape */
    0, 1, 2, 65000, 65535, 65536,
    0, 65535, 65536, 65536, 65536, 65536, /* one symbol: nearly free */
    0, 20000, 45000, 65530, 65536, 65536,
    0, 32768, 65535, 65536, 65536, 65536,
    0, 16384, 32768, 49152, 65535, 65536};

static uint64_t state = 88172645463325252ull;
static uint32_t rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (uint32_t)state;
}

int main(void)
{
    tcc_tables t = {DIM, STRIDE, 16, lower, length, cdf};
    tcc_tables bad = t;
    uint32_t bad_cdf[DIM * STRIDE];
    int32_t sym[DIM], back[DIM];
    uint8_t buf[128], tag[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    size_t n, i, max = tcc_max_bytes(&t);
    int k, refused = 0;

    CHECK(tcc_tables_check(&t) == TCC_OK);
    memcpy(bad_cdf, cdf, sizeof cdf);
    bad_cdf[2] = bad_cdf[1]; /* a zero frequency */
    bad.cdf = bad_cdf;
    CHECK(tcc_tables_check(&bad) == TCC_E_TABLES);
    bad = t;
    bad.precision = 25;
    CHECK(tcc_tables_check(&bad) == TCC_E_TABLES);

    /* round trips: in-support symbols and escapes (int32 extremes included), payload and raw */
    for (k = 0; k < 20000; k++) {
        for (i = 0; i < DIM; i++) {
            uint32_t r = rnd();
            sym[i] = (r % 7 == 0) ? (int32_t)rnd() : lower[i] + (int32_t)(r % length[i]);
        }
        if (k == 0) {
            sym[0] = INT32_MIN;
            sym[1] = INT32_MAX;
        }
        CHECK(tcc_payload_encode(&t, sym, tag, 8, buf, sizeof buf, &n) == TCC_OK);
        CHECK(n <= max + TCC_CHECK_BYTES);
        CHECK(n == TCC_CHECK_BYTES || buf[n - 1] != 0); /* shortest termination: never a trailing zero */
        CHECK(tcc_payload_decode(&t, buf, n, tag, 8, back) == TCC_OK);
        CHECK(memcmp(sym, back, sizeof sym) == 0);
        CHECK(tcc_payload_decode(&t, buf, n, tag, 7, back) == TCC_E_CHECK); /* another model's tag */
        buf[n] = 0;
        CHECK(tcc_decode(&t, buf + TCC_CHECK_BYTES, n + 1 - TCC_CHECK_BYTES, back) == TCC_E_DATA); /* extended */
        {   /* a buffer of exactly the coded size suffices, one byte less is refused */
            size_t coded = n - TCC_CHECK_BYTES, m = 0;
            uint8_t exact[128];
            CHECK(tcc_encode(&t, sym, exact, coded, &m) == TCC_OK && m == coded);
            CHECK(memcmp(exact, buf + TCC_CHECK_BYTES, coded) == 0);
            if (coded)
                CHECK(tcc_encode(&t, sym, exact, coded - 1, &m) == TCC_E_NOSPACE);
        }
    }
    /* the most likely vector codes to almost nothing */
    {
        int32_t likely[DIM] = {-1, 0, 0, 0, 5, -1000};
        CHECK(tcc_encode(&t, likely, buf, sizeof buf, &n) == TCC_OK && n <= 1);
        CHECK(tcc_decode(&t, buf, n, back) == TCC_OK && memcmp(likely, back, sizeof likely) == 0);
    }
    /* random bytes: every call returns (bounded work), most are refused */
    for (k = 0; k < 100000; k++) {
        size_t len = rnd() % 24;
        for (i = 0; i < len; i++)
            buf[i] = (uint8_t)rnd();
        refused += tcc_decode(&t, buf, len, back) != TCC_OK;
    }
    CHECK(refused > 0);
    /* the tables blob */
    {
        static uint8_t blob[TCC_BLOB_HEADER_BYTES + 4 * (2 * DIM + DIM * STRIDE)];
        uint32_t work[2 * DIM + DIM * STRIDE];
        tcc_tables loaded;
        size_t words, p = 16;
        memcpy(blob, "TCCT\x01\x10\0\0", 8);
        blob[8] = DIM;
        blob[12] = STRIDE;
        memset(blob + 9, 0, 3);
        memset(blob + 13, 0, 3);
        for (i = 0; i < DIM; i++, p += 4)
            blob[p] = (uint8_t)lower[i], blob[p + 1] = (uint8_t)(lower[i] >> 8), blob[p + 2] = (uint8_t)(lower[i] >> 16),
            blob[p + 3] = (uint8_t)((uint32_t)lower[i] >> 24);
        for (i = 0; i < DIM; i++, p += 4)
            blob[p] = (uint8_t)length[i], blob[p + 1] = blob[p + 2] = blob[p + 3] = 0;
        for (i = 0; i < DIM * STRIDE; i++, p += 4)
            blob[p] = (uint8_t)cdf[i], blob[p + 1] = (uint8_t)(cdf[i] >> 8), blob[p + 2] = (uint8_t)(cdf[i] >> 16),
            blob[p + 3] = 0;
        CHECK(tcc_blob_words(blob, sizeof blob, &words) == TCC_OK && words == 2 * DIM + DIM * STRIDE);
        CHECK(tcc_blob_load(blob, sizeof blob, work, words, &loaded) == TCC_OK);
        CHECK(loaded.dim == DIM && loaded.precision == 16 && loaded.lower[5] == -1000 && loaded.cdf[7] == 1);
        CHECK(tcc_blob_load(blob, sizeof blob - 1, work, words, &loaded) == TCC_E_BLOB);
        CHECK(tcc_blob_load(blob, sizeof blob, work, words - 1, &loaded) == TCC_E_NOSPACE);
        memset(blob + TCC_BLOB_HEADER_BYTES + 4 * 2 * DIM + 8, 0, 4); /* row 0: cdf[2] = 0 < cdf[1]: invalid */
        CHECK(tcc_blob_load(blob, sizeof blob, work, words, &loaded) == TCC_E_TABLES);
    }
    if (failures) {
        printf("%d checks failed\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
