/* taskcodec entropy coder "taskcodec-range56" (docs/wire-format.md, "Per-frame payload"): one image's integer
 * latents <-> a self-checking payload, driven only by the bundle's integer CDF tables.
 *
 * C99, no allocation, no floating point, every bound checked; the one source of truth for the runtime and server
 * (through the Python extension taskcodec.coding._tcc) and for camera firmware (libtaskcodec_fw.a).
 *
 * The coder: a byte-oriented range coder with a 64-bit low (56-bit window + carry), range in [2^48, 2^56] after
 * renormalisation, carries propagated through a cached byte and a count of pending 0xFF bytes. Each dimension's
 * symbol is coded with that dimension's CDF (precision P bits: total 2^P); a value outside the dimension's support
 * is coded as the escape entry followed by its zig-zag 32-bit value as two uniform 16-bit halves (high, then low).
 * Termination: the shortest byte string whose value, zero-padded, lies in the final interval.
 */
#ifndef TASKCODEC_CODER_H
#define TASKCODEC_CODER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCC_CODER_NAME "taskcodec-range56"
#define TCC_CHECK_BYTES 2u
#define TCC_MAX_PRECISION 24u
#define TCC_MAX_DIM 65536u
#define TCC_BLOB_MAGIC "TCCT"
#define TCC_BLOB_VERSION 1u
#define TCC_BLOB_HEADER_BYTES 16u

typedef enum {
    TCC_OK = 0,
    TCC_E_ARG = -1,     /* NULL pointer or inconsistent arguments */
    TCC_E_NOSPACE = -2, /* output buffer too small */
    TCC_E_TABLES = -3,  /* tables violate the format (see tcc_tables_check) */
    TCC_E_CHECK = -4,   /* the 2-byte check does not match: corrupt, truncated, extended or another model's */
    TCC_E_DATA = -5,    /* bytes that no encoder produces with these tables */
    TCC_E_BLOB = -6     /* a tables blob with a wrong magic, version, size or header */
} tcc_status;

/* The entropy tables of one model, as shipped in the bundle (tables.npz: lower, length, cdf, precision_bits).
 * Dimension d codes the support lower[d] .. lower[d] + length[d] - 1 as entries 0 .. length[d] - 1 and everything
 * else as the escape entry length[d]. Row d of cdf (stride entries, starting at cdf + d * stride) holds
 * cdf[0] = 0 < cdf[1] < ... < cdf[length[d] + 1] = 2^precision: entry i has frequency cdf[i + 1] - cdf[i] >= 1.
 * Entries after length[d] + 1 are padding (ignored). */
typedef struct {
    uint32_t dim;
    uint32_t stride;    /* entries per cdf row, >= max(length) + 2 */
    uint32_t precision; /* 1..TCC_MAX_PRECISION */
    const int32_t *lower;
    const uint32_t *length;
    const uint32_t *cdf;
} tcc_tables;

const char *tcc_strerror(int status);

/* TCC_OK if the tables satisfy every rule above (call once after loading; the coders assume valid tables). */
int tcc_tables_check(const tcc_tables *t);

/* An upper bound on the range-coded bytes of any symbol vector (escapes included), check not included. */
size_t tcc_max_bytes(const tcc_tables *t);

/* Range-coded bytes only (no check): symbols[dim] -> out[0..*out_len). */
int tcc_encode(const tcc_tables *t, const int32_t *symbols, uint8_t *out, size_t cap, size_t *out_len);
/* Inverse of tcc_encode. Reads at most dim + 2 * dim coded symbols; refuses bytes no encoder writes. */
int tcc_decode(const tcc_tables *t, const uint8_t *in, size_t len, int32_t *symbols);

/* The per-frame payload: check (2 bytes, CRC-16/CCITT over model_tag || u32le(n) || bytes, xor 0xFFFF, little-endian)
 * || the n range-coded bytes. model_tag is the bundle's 8-byte model tag (any length is accepted). */
int tcc_payload_encode(const tcc_tables *t, const int32_t *symbols, const uint8_t *model_tag, size_t tag_len,
                       uint8_t *out, size_t cap, size_t *out_len);
int tcc_payload_decode(const tcc_tables *t, const uint8_t *payload, size_t len, const uint8_t *model_tag,
                       size_t tag_len, int32_t *symbols);
void tcc_check(const uint8_t *model_tag, size_t tag_len, const uint8_t *bytes, size_t n, uint8_t out[TCC_CHECK_BYTES]);

/* Tables blob (for firmware that loads a model's tables from flash; `taskcodec firmware tables BUNDLE --out FILE`):
 *   "TCCT" | version u8 (=1) | precision u8 | reserved u16 (=0) | dim u32 | stride u32 |
 *   lower i32[dim] | length u32[dim] | cdf u32[dim * stride]            (all little-endian)
 * tcc_blob_words: how many uint32 words tcc_blob_load needs in `work`. tcc_blob_load copies the arrays into work
 * (any alignment and byte order of the blob) and points *t into it; the tables are checked. */
int tcc_blob_words(const uint8_t *blob, size_t len, size_t *words);
int tcc_blob_load(const uint8_t *blob, size_t len, uint32_t *work, size_t work_words, tcc_tables *t);

#ifdef __cplusplus
}
#endif
#endif
