/* Line-oriented driver of the entropy coder (taskcodec_coder.h) for cross-checks against the Python coder (tests,
 * debugging) -- and a demonstration that firmware encodes payloads from a bundle's tables without Python.
 *   tcc_tool TABLES_BLOB      (from `taskcodec firmware tables BUNDLE --out FILE`)
 * One command per stdin line, one answer per stdout line ("ok ..." or "err CODE"); "-" stands for empty hex / no tag.
 *   enc TAG_HEX|- S0 S1 ... S(D-1)   -> ok PAYLOAD_HEX   (with TAG: check || bytes; with -: the coded bytes only)
 *   dec TAG_HEX|- DATA_HEX           -> ok S0 S1 ... S(D-1)
 *   fuzz N SEED                      -> ok TRIED REFUSED   (decodes N random and mutated inputs; must not crash)
 *   load S0 S1 ... S(D-1)            -> ok COUNT           (keeps a symbol vector for `time`)
 *   time REPS TAG_HEX                -> ok ENC_NS DEC_NS   (payload encode / decode of every kept vector, REPS
 *                                       times; nanoseconds per vector, best of the REPS passes)
 * Buffers are allocated with exact sizes so that AddressSanitizer catches any access past them. */
#define _POSIX_C_SOURCE 200809L
#include "taskcodec_coder.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int unhex(const char *s, uint8_t **out, size_t *len)
{
    size_t n, i;
    *len = 0;
    *out = NULL;
    if (strcmp(s, "-") == 0)
        return 0;
    n = strlen(s);
    if (n % 2 || !(*out = malloc(n / 2 ? n / 2 : 1)))
        return -1;
    for (i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        (*out)[i] = (uint8_t)v;
    }
    *len = n / 2;
    return 0;
}

static uint64_t rng_state;
static uint32_t rnd(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}

int main(int argc, char **argv)
{
    static char line[1 << 20];
    uint8_t *blob;
    uint32_t *work;
    size_t blob_len, words, cap;
    long got;
    FILE *f;
    tcc_tables t;
    int32_t *sym, *kept = NULL;
    size_t n_kept = 0;
    uint8_t *out;
    int rc;
    if (argc != 2 || !(f = fopen(argv[1], "rb"))) {
        fprintf(stderr, "usage: tcc_tool TABLES_BLOB < commands\n");
        return 2;
    }
    fseek(f, 0, SEEK_END);
    got = ftell(f);
    fseek(f, 0, SEEK_SET);
    blob_len = got > 0 ? (size_t)got : 0;
    blob = malloc(blob_len ? blob_len : 1);
    if (!blob || fread(blob, 1, blob_len, f) != blob_len) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    fclose(f);
    if ((rc = tcc_blob_words(blob, blob_len, &words)) != TCC_OK || !(work = malloc(words * 4)) ||
        (rc = tcc_blob_load(blob, blob_len, work, words, &t)) != TCC_OK) {
        fprintf(stderr, "tables refused: %s\n", tcc_strerror(rc));
        return 3;
    }
    cap = tcc_max_bytes(&t) + TCC_CHECK_BYTES;
    sym = malloc(t.dim * sizeof *sym);
    out = malloc(cap);
    if (!sym || !out)
        return 2;
    while (fgets(line, sizeof line, stdin)) {
        char *cmd = strtok(line, " \n"), *tag_hex = strtok(NULL, " \n");
        uint8_t *tag = NULL, *data = NULL;
        size_t tag_len = 0, data_len = 0, n = 0, i;
        if (!cmd || !tag_hex) {
            printf("err bad-line\n");
            continue;
        }
        if (strcmp(cmd, "fuzz") == 0) {
            unsigned long iters = strtoul(tag_hex, NULL, 10), tried = 0, refused = 0, k;
            char *seed = strtok(NULL, " \n");
            uint8_t buf[64];
            rng_state = seed ? strtoull(seed, NULL, 10) : 1;
            for (k = 0; k < iters; k++) {
                size_t len = rnd() % sizeof buf, j;
                uint8_t *exact;
                if (k % 2) { /* a real payload of random symbols, mutated */
                    for (i = 0; i < t.dim; i++)
                        sym[i] = (rnd() % 8 == 0) ? (int32_t)rnd() : t.lower[i] + (int32_t)(rnd() % t.length[i]);
                    if (tcc_encode(&t, sym, out, cap, &n) != TCC_OK)
                        return 4;
                    len = n < sizeof buf ? n : sizeof buf;
                    memcpy(buf, out, len);
                    if (len && rnd() % 4)
                        buf[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
                    else if (len && rnd() % 2)
                        len--;
                } else {
                    for (j = 0; j < len; j++)
                        buf[j] = (uint8_t)rnd();
                }
                exact = malloc(len ? len : 1);
                memcpy(exact, buf, len);
                tried++;
                refused += tcc_decode(&t, exact, len, sym) != TCC_OK;
                free(exact);
            }
            printf("ok %lu %lu\n", tried, refused);
            fflush(stdout);
            continue;
        }
        if (strcmp(cmd, "load") == 0) {
            int32_t *grown = realloc(kept, (n_kept + 1) * t.dim * sizeof *kept);
            char *tok = tag_hex;
            if (!grown)
                return 2;
            kept = grown;
            for (i = 0; i < t.dim; i++) {
                kept[n_kept * t.dim + i] = tok ? (int32_t)strtoll(tok, NULL, 10) : 0;
                tok = strtok(NULL, " \n");
            }
            printf("ok %zu\n", ++n_kept);
            fflush(stdout);
            continue;
        }
        if (strcmp(cmd, "time") == 0) {
            unsigned long reps = strtoul(tag_hex, NULL, 10), r;
            char *th = strtok(NULL, " \n");
            uint8_t *payloads = malloc(n_kept * cap + 1);
            size_t *lens = malloc((n_kept + 1) * sizeof *lens), j;
            double best_enc = 1e300, best_dec = 1e300, t0;
            unsigned long bad = 0;
            if (!th || unhex(th, &tag, &tag_len) || !payloads || !lens || !n_kept) {
                printf("err bad-time\n");
                continue;
            }
            for (r = 0; r < reps; r++) {
                t0 = now_ns();
                for (j = 0; j < n_kept; j++)
                    bad += tcc_payload_encode(&t, kept + j * t.dim, tag, tag_len, payloads + j * cap, cap, lens + j) != 0;
                if (now_ns() - t0 < best_enc)
                    best_enc = now_ns() - t0;
                t0 = now_ns();
                for (j = 0; j < n_kept; j++)
                    bad += tcc_payload_decode(&t, payloads + j * cap, lens[j], tag, tag_len, sym) != 0;
                if (now_ns() - t0 < best_dec)
                    best_dec = now_ns() - t0;
            }
            if (bad)
                printf("err %lu\n", bad);
            else
                printf("ok %.1f %.1f\n", best_enc / (double)n_kept, best_dec / (double)n_kept);
            fflush(stdout);
            free(payloads);
            free(lens);
            free(tag);
            continue;
        }
        if (unhex(tag_hex, &tag, &tag_len)) {
            printf("err bad-hex\n");
            continue;
        }
        if (strcmp(cmd, "enc") == 0) {
            for (i = 0; i < t.dim; i++) {
                char *tok = strtok(NULL, " \n");
                sym[i] = tok ? (int32_t)strtoll(tok, NULL, 10) : 0;
            }
            rc = strcmp(tag_hex, "-") ? tcc_payload_encode(&t, sym, tag, tag_len, out, cap, &n)
                                      : tcc_encode(&t, sym, out, cap, &n);
            if (rc) {
                printf("err %d\n", rc);
            } else {
                fputs("ok ", stdout);
                if (!n)
                    fputs("-", stdout);
                for (i = 0; i < n; i++)
                    printf("%02x", out[i]);
                putchar('\n');
            }
        } else if (strcmp(cmd, "dec") == 0) {
            char *hex = strtok(NULL, " \n");
            if (!hex || unhex(hex, &data, &data_len)) {
                printf("err bad-hex\n");
            } else {
                rc = strcmp(tag_hex, "-") ? tcc_payload_decode(&t, data, data_len, tag, tag_len, sym)
                                          : tcc_decode(&t, data, data_len, sym);
                if (rc) {
                    printf("err %d\n", rc);
                } else {
                    fputs("ok", stdout);
                    for (i = 0; i < t.dim; i++)
                        printf(" %" PRId32, sym[i]);
                    putchar('\n');
                }
            }
        } else {
            printf("err unknown-command\n");
        }
        free(tag);
        free(data);
        fflush(stdout);
    }
    free(sym);
    free(kept);
    free(out);
    free(work);
    free(blob);
    return 0;
}
