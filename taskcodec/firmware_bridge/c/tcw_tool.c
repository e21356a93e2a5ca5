/* Line-oriented driver of taskcodec_wire for cross-checks against the Python reference (tests and debugging).
 * One command per stdin line, one answer per stdout line ("ok ..." or "err CODE"); "-" stands for empty hex.
 *   reply HEX                          -> ok TYPE VERSION CODE EPOCH FIRST_SEQ COUNT REASON_HEX CAPABILITIES
 *   hello CAP TAG_HEX CAMERA_HEX TOKEN_HEX [CAPABILITIES RESIDUAL_TAG_HEX] -> ok MESSAGE_HEX
 *   batch CAP EPOCH FIRST_SEQ TS:PAYLOAD_HEX ... -> ok MESSAGE_HEX
 *   tbatch CAP EPOCH FIRST_SEQ TS:KIND:PAYLOAD_HEX ... -> ok MESSAGE_HEX   (v3 TBATCH)
 *   cbatch CAP EPOCH FIRST_SEQ INTERVAL TS:KIND:PAYLOAD_HEX ... -> ok MESSAGE_HEX   (v4 CBATCH; the tool keeps one
 *                                      connection link across lines, moved on by every CBATCH built)
 *   link reset                         -> ok -   (a new connection)
 *   check TAG_HEX PAYLOAD_HEX          -> ok CHECK_HEX
 *   varint CAP VALUE                   -> ok HEX
 * Output buffers are allocated with exactly CAP bytes so that AddressSanitizer catches any write past them. */
#define _POSIX_C_SOURCE 200809L
#include "taskcodec_wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int unhex(const char *s, uint8_t **out, size_t *len)
{
    size_t n, i;
    *out = NULL;
    *len = 0;
    if (strcmp(s, "-") == 0) {
        *out = malloc(1);
        return *out ? 0 : -1;
    }
    n = strlen(s);
    if (n % 2)
        return -1;
    *out = malloc(n / 2 ? n / 2 : 1); /* exact size: ASan sees reads past the end */
    if (!*out)
        return -1;
    for (i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) {
            free(*out);
            *out = NULL;
            return -1;
        }
        (*out)[i] = (uint8_t)v;
    }
    *len = n / 2;
    return 0;
}

static void print_hex(const uint8_t *p, size_t n)
{
    size_t i;
    if (n == 0)
        fputs("-", stdout);
    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
}

static void answer(int rc, const uint8_t *p, size_t n)
{
    if (rc != TCW_OK) {
        printf("err %d\n", rc);
        return;
    }
    fputs("ok ", stdout);
    print_hex(p, n);
    fputs("\n", stdout);
}

static void cmd_reply(char *arg)
{
    uint8_t *msg;
    size_t len;
    tcw_reply r;
    int rc;
    if (!arg || unhex(arg, &msg, &len)) {
        puts("err usage");
        return;
    }
    rc = tcw_decode_reply(msg, len, &r);
    if (rc != TCW_OK) {
        printf("err %d\n", rc);
    } else {
        printf("ok %u %u %u %llu %llu %llu ", r.type, r.version, r.code, (unsigned long long)r.epoch,
               (unsigned long long)r.first_seq, (unsigned long long)r.count);
        print_hex(r.reason, r.reason_len);
        printf(" %u\n", (unsigned)r.capabilities);
    }
    free(msg);
}

static void cmd_hello(char *save)
{
    char *cap_s = strtok_r(NULL, " ", &save), *tag_s = strtok_r(NULL, " ", &save);
    char *cam_s = strtok_r(NULL, " ", &save), *tok_s = strtok_r(NULL, " ", &save);
    uint8_t *tag = NULL, *cam = NULL, *tok = NULL, *out, *rtag = NULL;
    size_t tag_len, cam_len, tok_len, cap, len = 0, rtag_len = 0;
    char *caps_s, *rtag_s;
    int rc;
    if (!tok_s || unhex(tag_s, &tag, &tag_len) || unhex(cam_s, &cam, &cam_len) || unhex(tok_s, &tok, &tok_len) ||
        tag_len != TCW_MODEL_TAG_BYTES) {
        puts("err usage");
        free(tag), free(cam), free(tok);
        return;
    }
    cap = strtoull(cap_s, NULL, 10);
    out = malloc(cap ? cap : 1);
    caps_s = strtok_r(NULL, " ", &save);
    rtag_s = caps_s ? strtok_r(NULL, " ", &save) : NULL;
    if (caps_s && rtag_s && unhex(rtag_s, &rtag, &rtag_len) == 0 && rtag_len == TCW_RESIDUAL_TAG_BYTES)
        rc = tcw_encode_hello_caps(out, cap, &len, tag, (const char *)cam, cam_len, tok, tok_len,
                                   (uint32_t)strtoul(caps_s, NULL, 10), rtag);
    else if (caps_s)
        rc = tcw_encode_hello_caps(out, cap, &len, tag, (const char *)cam, cam_len, tok, tok_len,
                                   (uint32_t)strtoul(caps_s, NULL, 10), NULL);
    else
        rc = tcw_encode_hello(out, cap, &len, tag, (const char *)cam, cam_len, tok, tok_len);
    answer(rc, out, len);
    free(out), free(tag), free(cam), free(tok), free(rtag);
}

static void cmd_batch(char *save)
{
    char *cap_s = strtok_r(NULL, " ", &save), *epoch_s = strtok_r(NULL, " ", &save);
    char *first_s = strtok_r(NULL, " ", &save), *item;
    tcw_frame frames[TCW_MAX_FRAMES_PER_BATCH + 1];
    uint8_t *payloads[TCW_MAX_FRAMES_PER_BATCH + 1];
    size_t n = 0, i, cap, len = 0;
    uint8_t *out;
    int rc, bad = !first_s;
    while (!bad && (item = strtok_r(NULL, " ", &save)) != NULL) {
        char *colon = strchr(item, ':');
        if (!colon || n > TCW_MAX_FRAMES_PER_BATCH) {
            bad = 1;
            break;
        }
        *colon = 0;
        frames[n].ts_ms = strtoll(item, NULL, 10);
        if (unhex(colon + 1, &payloads[n], &frames[n].len)) {
            bad = 1;
            break;
        }
        frames[n].payload = payloads[n];
        n++;
    }
    if (bad) {
        puts("err usage");
    } else {
        cap = strtoull(cap_s, NULL, 10);
        out = malloc(cap ? cap : 1);
        rc = tcw_encode_batch(out, cap, &len, strtoull(epoch_s, NULL, 10), strtoull(first_s, NULL, 10), frames, n);
        answer(rc, out, len);
        free(out);
    }
    for (i = 0; i < n; i++)
        free(payloads[i]);
}

/* The "ts:kind:hex" items of a TBATCH or CBATCH line (shared by both commands). */
static int64_t item_ts[TCW_MAX_FRAMES_PER_BATCH + 1];
static unsigned item_kinds[TCW_MAX_FRAMES_PER_BATCH + 1];
static uint8_t *item_payloads[TCW_MAX_FRAMES_PER_BATCH + 1];
static size_t item_lens[TCW_MAX_FRAMES_PER_BATCH + 1];

/* Parses the rest of the line into item_*; returns how many items (0 on a bad line). *parsed says how many
   payloads were allocated, for free_items(). */
static size_t parse_items(char **save, size_t *parsed)
{
    size_t n = 0;
    char *item;
    while ((item = strtok_r(NULL, " ", save)) != NULL) {
        char *c1 = strchr(item, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2 || n > TCW_MAX_FRAMES_PER_BATCH) {
            *parsed = n;
            return 0;
        }
        *c1 = 0;
        *c2 = 0;
        item_ts[n] = strtoll(item, NULL, 10);
        item_kinds[n] = (unsigned)strtoul(c1 + 1, NULL, 10);
        if (unhex(c2 + 1, &item_payloads[n], &item_lens[n])) {
            *parsed = n;
            return 0;
        }
        n++;
    }
    *parsed = n;
    return n;
}

static void free_items(size_t parsed)
{
    size_t i;
    for (i = 0; i < parsed; i++)
        free(item_payloads[i]);
}

static void cmd_tbatch(char *save)
{
    char *cap_s = strtok_r(NULL, " ", &save), *epoch_s = strtok_r(NULL, " ", &save);
    char *first_s = strtok_r(NULL, " ", &save);
    size_t n = 0, parsed = 0, i, cap, len = 0;
    uint8_t *out;
    tcw_batch b;
    int rc;
    if (first_s)
        n = parse_items(&save, &parsed);
    if (n == 0) {
        puts("err usage");
    } else {
        cap = strtoull(cap_s, NULL, 10);
        out = malloc(cap ? cap : 1);
        rc = tcw_batch_begin_temporal(&b, out, cap, strtoull(epoch_s, NULL, 10), strtoull(first_s, NULL, 10));
        for (i = 0; rc == TCW_OK && i < n; i++)
            rc = tcw_batch_add_kind(&b, item_ts[i], item_kinds[i], item_payloads[i], item_lens[i]);
        if (rc == TCW_OK)
            rc = tcw_batch_finish(&b, &len);
        answer(rc, out, len);
        free(out);
    }
    free_items(parsed);
}

static tcw_link tool_link; /* one connection's CBATCH link across lines */

static void cmd_cbatch(char *save)
{
    char *cap_s = strtok_r(NULL, " ", &save), *epoch_s = strtok_r(NULL, " ", &save);
    char *first_s = strtok_r(NULL, " ", &save), *interval_s = strtok_r(NULL, " ", &save);
    size_t n = 0, parsed = 0, i, cap, len = 0;
    uint8_t *out;
    tcw_cbatch c;
    int rc;
    if (interval_s)
        n = parse_items(&save, &parsed);
    if (n == 0) {
        puts("err usage");
    } else {
        cap = strtoull(cap_s, NULL, 10);
        out = malloc(cap ? cap : 1);
        rc = tcw_cbatch_begin(&c, out, cap, &tool_link, strtoull(epoch_s, NULL, 10), strtoull(first_s, NULL, 10),
                              (uint32_t)strtoul(interval_s, NULL, 10));
        for (i = 0; rc == TCW_OK && i < n; i++)
            rc = tcw_cbatch_add(&c, item_ts[i], item_kinds[i], item_payloads[i], item_lens[i]);
        if (rc == TCW_OK)
            rc = tcw_cbatch_finish(&c, &len);
        answer(rc, out, len);
        free(out);
    }
    free_items(parsed);
}

static void cmd_check(char *save)
{
    char *tag_s = strtok_r(NULL, " ", &save), *pay_s = strtok_r(NULL, " ", &save);
    uint8_t *tag = NULL, *pay = NULL, check[TCW_STREAM_CHECK_BYTES];
    size_t tag_len, pay_len;
    if (!pay_s || unhex(tag_s, &tag, &tag_len) || unhex(pay_s, &pay, &pay_len)) {
        puts("err usage");
    } else {
        tcw_stream_check(tag, tag_len, pay, pay_len, check);
        answer(TCW_OK, check, sizeof(check));
    }
    free(tag), free(pay);
}

static void cmd_varint(char *save)
{
    char *cap_s = strtok_r(NULL, " ", &save), *v_s = strtok_r(NULL, " ", &save);
    size_t cap, pos = 0;
    uint8_t *out;
    int rc;
    if (!v_s) {
        puts("err usage");
        return;
    }
    cap = strtoull(cap_s, NULL, 10);
    out = malloc(cap ? cap : 1);
    rc = tcw_put_varint(out, cap, &pos, strtoull(v_s, NULL, 10));
    answer(rc, out, pos);
    free(out);
}

int main(void)
{
    char *line = NULL, *save, *cmd;
    size_t size = 0;
    ssize_t n;
    while ((n = getline(&line, &size, stdin)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = 0;
        cmd = strtok_r(line, " ", &save);
        if (!cmd)
            puts("err usage");
        else if (strcmp(cmd, "reply") == 0)
            cmd_reply(strtok_r(NULL, " ", &save));
        else if (strcmp(cmd, "tbatch") == 0)
            cmd_tbatch(save);
        else if (strcmp(cmd, "cbatch") == 0)
            cmd_cbatch(save);
        else if (strcmp(cmd, "link") == 0) {
            tcw_link_reset(&tool_link);
            puts("ok -");
        } else if (strcmp(cmd, "hello") == 0)
            cmd_hello(save);
        else if (strcmp(cmd, "batch") == 0)
            cmd_batch(save);
        else if (strcmp(cmd, "check") == 0)
            cmd_check(save);
        else if (strcmp(cmd, "varint") == 0)
            cmd_varint(save);
        else
            puts("err usage");
        fflush(stdout);
    }
    free(line);
    return 0;
}
