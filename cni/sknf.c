/* sknf CNI plugin: hands each CNI request to the node agent over its root-only unix socket.
 *
 * Runtimes exec this for every pod, on hosts that may have no Python (Flatcar, Talos, Bottlerocket,
 * CoreOS): it is built static (musl) and needs nothing at run time. It does no networking itself;
 * the warm agent validates the request and does the work. The plugin checks the command, the input
 * size, that stdin is one well-formed JSON value (RFC 8259, strict UTF-8, NaN/Infinity refused) and
 * where the agent is (`agentSocket`, `stateDir`: non-empty strings when present), then sends the
 * netconf as the runtime wrote it inside the JSON request of sknf/api.py:
 *   {"op":"cni","env":{CNI_* variables},"config":<stdin>}
 * The agent replies with the exit status digit and the exact text to print; the plugin copies it.
 * The CNI_* rules that depend on the verb stay in the agent (sknf/cni.py), in one place.
 *
 * It answers VERSION alone. When the agent cannot be reached, ADD/CHECK/GC fail with code 11 (try
 * again later) and STATUS with 50 (not available); DEL must not fail, so it parks the request in
 * <stateDir>/pending-del/ for the agent to replay at start (sknf.cni.drain_pending_dels; DEL is
 * idempotent, replaying one that did reach the agent is harmless) and succeeds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_INPUT (1 << 20)
#define MAX_DEPTH 500 /* the agent's json.loads recurses; deeper input would be its internal error */
#define TIMEOUT_S 60  /* an ADD that takes longer is stuck; the runtime retries and later sends DEL */
#define LATEST "1.1.0"

static const char *const SUPPORTED[] = {"0.3.1", "0.4.0", "1.0.0", "1.1.0"}; /* = sknf.cni.SUPPORTED_VERSIONS */
static const char *const COMMANDS[] = {"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"};
static const char *const ENV[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
                                  "CNI_PATH"};
#define N(a) (sizeof(a) / sizeof((a)[0]))

/* A growable byte buffer; allocation failure ends the process (nothing is half-done at that point). */
struct buf {
    char *p;
    size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            fputs("sknf: out of memory\n", stderr);
            exit(1);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void putf(struct buf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    put(b, tmp, n < 0 ? 0 : (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Length of the well-formed UTF-8 sequence at s (RFC 3629: no overlongs, surrogates or > U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *s, size_t avail) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (!n || avail < n) return 0;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    if (c == 0xe0 && s[1] < 0xa0) return 0; /* overlong */
    if (c == 0xed && s[1] > 0x9f) return 0; /* surrogate */
    if (c == 0xf0 && s[1] < 0x90) return 0; /* overlong */
    if (c == 0xf4 && s[1] > 0x8f) return 0; /* above U+10FFFF */
    return n;
}

/* Append s as a JSON string literal. Bytes that are not UTF-8 become \udcXX, as Python's
 * surrogateescape spells them, so the agent sees exactly what the runtime passed. */
static void quote(struct buf *b, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t len = utf8_len(u + i, n - i);
        if (c == '"' || c == '\\') {
            put(b, "\\", 1);
            put(b, &u[i], 1);
        } else if (c == '\n') {
            puts_(b, "\\n");
        } else if (c < 0x20 || c == 0x7f) {
            putf(b, "\\u%04x", c);
        } else if (!len) {
            putf(b, "\\udc%02x", c);
            len = 1;
        } else {
            put(b, &u[i], len);
        }
        i += len ? len : 1;
    }
    put(b, "\"", 1);
}

/* -- a strict JSON validator that also picks out the top-level keys the plugin reads -------------- */

struct token { /* a top-level member's value as it appears in the input */
    const char *start;
    size_t len;
};

struct parser {
    const unsigned char *s;
    size_t len, pos;
    int depth;
    const char *err;
    struct token version, socket, state; /* the last cniVersion/agentSocket/stateDir, as JSON wins */
};

static void ws(struct parser *p) {
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' ||
                               p->s[p->pos] == '\r'))
        p->pos++;
}

static int fail(struct parser *p, const char *err) {
    if (!p->err) p->err = err;
    return 0;
}

static int hexdigit(unsigned c) {
    return c >= '0' && c <= '9' ? (int)(c - '0') : c >= 'a' && c <= 'f' ? (int)(c - 'a' + 10)
           : c >= 'A' && c <= 'F' ? (int)(c - 'A' + 10) : -1;
}

static int hex4(const unsigned char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hexdigit(s[i]);
        if (d < 0) return 0;
        v = v * 16 + (unsigned)d;
    }
    *out = v;
    return 1;
}

static int string(struct parser *p) {
    p->pos++; /* the opening quote */
    while (p->pos < p->len) {
        unsigned c = p->s[p->pos];
        if (c == '"') {
            p->pos++;
            return 1;
        }
        if (c < 0x20) return fail(p, "invalid control character in string");
        if (c == '\\') {
            unsigned v;
            if (p->pos + 1 >= p->len) break;
            c = p->s[p->pos + 1];
            if (c == 'u') {
                if (p->pos + 6 > p->len || !hex4(p->s + p->pos + 2, &v)) return fail(p, "invalid \\u escape");
                p->pos += 6;
            } else if (c && strchr("\"\\/bfnrt", (int)c)) {
                p->pos += 2;
            } else {
                return fail(p, "invalid escape");
            }
            continue;
        }
        size_t n = utf8_len(p->s + p->pos, p->len - p->pos);
        if (!n) return fail(p, "invalid UTF-8");
        p->pos += n;
    }
    return fail(p, "unterminated string");
}

static int digits(struct parser *p) {
    size_t start = p->pos;
    while (p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    return p->pos > start;
}

static int number(struct parser *p) {
    if (p->s[p->pos] == '-') p->pos++;
    if (p->pos < p->len && p->s[p->pos] == '0') p->pos++;
    else if (!digits(p)) return fail(p, "expecting value");
    if (p->pos < p->len && p->s[p->pos] == '.') {
        p->pos++;
        if (!digits(p)) return fail(p, "expecting digits after the decimal point");
    }
    if (p->pos < p->len && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        p->pos++;
        if (p->pos < p->len && (p->s[p->pos] == '+' || p->s[p->pos] == '-')) p->pos++;
        if (!digits(p)) return fail(p, "expecting exponent digits");
    }
    return 1;
}

static int literal(struct parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n)) return fail(p, "expecting value");
    p->pos += n;
    return 1;
}

static int key_is(const unsigned char *tok, size_t len, const char *name);
static int value(struct parser *p);

static int container(struct parser *p, unsigned char close) {
    int object = close == '}';
    if (++p->depth > MAX_DEPTH) return fail(p, "nested too deeply");
    p->pos++;
    ws(p);
    if (p->pos < p->len && p->s[p->pos] == close) {
        p->pos++;
        p->depth--;
        return 1;
    }
    for (;;) {
        struct token *slot = NULL;
        if (object) {
            if (p->pos >= p->len || p->s[p->pos] != '"') return fail(p, "expecting property name in double quotes");
            size_t start = p->pos;
            if (!string(p)) return 0;
            if (p->depth == 1) {
                const unsigned char *k = p->s + start;
                size_t n = p->pos - start;
                slot = key_is(k, n, "cniVersion") ? &p->version : key_is(k, n, "agentSocket") ? &p->socket
                       : key_is(k, n, "stateDir") ? &p->state : NULL;
            }
            ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') return fail(p, "expecting ':' delimiter");
            p->pos++;
            ws(p);
        }
        size_t start = p->pos;
        if (!value(p)) return 0;
        if (slot) *slot = (struct token){(const char *)p->s + start, p->pos - start};
        ws(p);
        if (p->pos < p->len && p->s[p->pos] == close) {
            p->pos++;
            p->depth--;
            return 1;
        }
        if (p->pos >= p->len || p->s[p->pos] != ',') return fail(p, "expecting ',' delimiter");
        p->pos++;
        ws(p);
    }
}

static int value(struct parser *p) {
    if (p->pos >= p->len) return fail(p, "expecting value");
    switch (p->s[p->pos]) {
    case '{': return container(p, '}');
    case '[': return container(p, ']');
    case '"': return string(p);
    case 't': return literal(p, "true");
    case 'f': return literal(p, "false");
    case 'n': return literal(p, "null");
    default: return number(p);
    }
}

/* Decode a JSON string token (validated) into bytes: UTF-8, a lone surrogate as its 3-byte form. */
static char *decode_string(const char *tok, size_t len, size_t *out_len) {
    struct buf b = {0};
    put(&b, "", 0);
    for (size_t i = 1; i + 1 < len;) {
        unsigned c = (unsigned char)tok[i];
        if (c != '\\') {
            put(&b, &tok[i++], 1);
            continue;
        }
        c = (unsigned char)tok[i + 1];
        if (c != 'u') {
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
            put(&b, &to[strchr(from, (int)c) - from], 1);
            i += 2;
            continue;
        }
        unsigned v, lo;
        hex4((const unsigned char *)tok + i + 2, &v);
        i += 6;
        if (v >= 0xd800 && v < 0xdc00 && i + 6 < len && tok[i] == '\\' && tok[i + 1] == 'u' &&
            hex4((const unsigned char *)tok + i + 2, &lo) && lo >= 0xdc00 && lo < 0xe000) {
            v = 0x10000 + ((v - 0xd800) << 10) + (lo - 0xdc00);
            i += 6;
        }
        unsigned char e[4];
        size_t n = v < 0x80 ? 1 : v < 0x800 ? 2 : v < 0x10000 ? 3 : 4;
        static const unsigned lead[] = {0, 0, 0xc0, 0xe0, 0xf0};
        for (size_t k = n; k-- > 1; v >>= 6) e[k] = (unsigned char)(0x80 | (v & 0x3f));
        e[0] = (unsigned char)(n == 1 ? v : lead[n] | v);
        put(&b, e, n);
    }
    *out_len = b.len;
    return b.p;
}

static int key_is(const unsigned char *tok, size_t len, const char *name) {
    size_t n;
    char *k = decode_string((const char *)tok, len, &n);
    int same = n == strlen(name) && !memcmp(k, name, n);
    free(k);
    return same;
}

/* -- output -------------------------------------------------------------------------------------- */

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return; /* the runtime went away; nothing left to tell it */
        p += w;
        n -= (size_t)w;
    }
}

static int error(const char *version, int code, const char *msg, const char *details, size_t details_len) {
    struct buf b = {0};
    putf(&b, "{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":", version, code);
    quote(&b, msg, strlen(msg));
    if (details_len) {
        puts_(&b, ",\"details\":");
        quote(&b, details, details_len);
    }
    puts_(&b, "}\n");
    write_all(1, b.p, b.len);
    free(b.p);
    return 1;
}

static int errorf(const char *version, int code, const char *msg, const char *fmt, ...) {
    char details[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(details, sizeof details, fmt, ap);
    va_end(ap);
    return error(version, code, msg, details, strlen(details));
}

/* -- the agent ----------------------------------------------------------------------------------- */

/* A failure reaching the agent, worded like Python's OSError ("[Errno 2] No such file or directory"). */
static char why[256];

static int oserror(const char *what) {
    snprintf(why, sizeof why, "[Errno %d] %s%s%s", errno, strerror(errno), *what ? ": " : "", what);
    return -1;
}

/* Send one request; on success fill *reply with the agent's reply (status digit first) and return 0. */
static int ask_agent(const char *path, size_t path_len, const struct buf *request, struct buf *reply) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (memchr(path, 0, path_len)) return snprintf(why, sizeof why, "embedded null byte"), -1;
    if (path_len > sizeof addr.sun_path) return snprintf(why, sizeof why, "AF_UNIX path too long"), -1;
    memcpy(addr.sun_path, path, path_len);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return oserror("");
    struct timeval tv = {.tv_sec = TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds connect() on a full backlog */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int rc = -1;
    if (connect(fd, (struct sockaddr *)&addr, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len))) {
        oserror("");
        goto out;
    }
    for (size_t sent = 0; sent < request->len;) {
        ssize_t n = send(fd, request->p + sent, request->len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            oserror("");
            goto out;
        }
        sent += (size_t)n;
    }
    shutdown(fd, SHUT_WR);
    for (;;) {
        char chunk[65536];
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            oserror("");
            goto out;
        }
        if (n == 0) break;
        put(reply, chunk, (size_t)n);
    }
    if (!reply->len || (reply->p[0] != '0' && reply->p[0] != '1')) {
        snprintf(why, sizeof why, reply->len ? "malformed agent reply" : "the agent closed the connection without a reply");
        goto out;
    }
    rc = 0;
out:
    close(fd);
    return rc;
}

/* Write the DEL request atomically where the agent looks for it at start. */
static int park_del(const char *state_dir, size_t state_len, const struct buf *request) {
    if (memchr(state_dir, 0, state_len)) return snprintf(why, sizeof why, "embedded null byte"), -1;
    char pending[4096], tmp[4200], final[4200];
    if (snprintf(pending, sizeof pending, "%s/pending-del", state_dir) >= (int)sizeof pending)
        return errno = ENAMETOOLONG, oserror(state_dir);
    if (mkdir(state_dir, 0700) && errno != EEXIST) return oserror(state_dir);
    if (mkdir(pending, 0700) && errno != EEXIST) return oserror(pending);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    unsigned long long ns = (unsigned long long)now.tv_sec * 1000000000ULL + (unsigned long long)now.tv_nsec;
    snprintf(final, sizeof final, "%s/%020llu-%d.json", pending, ns, (int)getpid());
    snprintf(tmp, sizeof tmp, "%s/.%020llu-%d.json", pending, ns, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return oserror(tmp);
    size_t done = 0;
    while (done < request->len) {
        ssize_t n = write(fd, request->p + done, request->len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        done += (size_t)n;
    }
    if (done < request->len || fsync(fd)) {
        oserror(tmp);
        close(fd);
        unlink(tmp);
        return -1;
    }
    close(fd);
    if (rename(tmp, final)) {
        oserror(final);
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* -- main ---------------------------------------------------------------------------------------- */

static int read_stdin(struct buf *in) {
    for (;;) {
        char chunk[65536];
        ssize_t n = read(0, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return 0;
        put(in, chunk, (size_t)n);
        if (in->len > MAX_INPUT) return 0;
    }
}

static int is_string(struct token t) { return t.start && t.start[0] == '"'; }

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    size_t which = 0;
    while (which < N(COMMANDS) && !(command && !strcmp(command, COMMANDS[which]))) which++;
    if (which == N(COMMANDS)) {
        if (!command || !*command) return error(LATEST, 4, "invalid CNI_COMMAND", "missing", 7);
        struct buf d = {0};
        quote(&d, command, strlen(command));
        d.p[0] = d.p[d.len - 1] = '\'';
        int rc = error(LATEST, 4, "invalid CNI_COMMAND", d.p, d.len);
        free(d.p);
        return rc;
    }
    struct buf in = {0};
    put(&in, "", 0);
    if (read_stdin(&in)) return errorf(LATEST, 5, "cannot read the network configuration", "stdin: %s",
                                       strerror(errno));
    if (in.len > MAX_INPUT)
        return errorf(LATEST, 5, "network configuration too large", "more than %d bytes", MAX_INPUT);
    struct parser p = {.s = (const unsigned char *)in.p, .len = in.len};
    ws(&p);
    size_t first = p.pos;
    if (value(&p)) {
        ws(&p);
        if (p.pos < p.len) fail(&p, "extra data");
    }
    int object = !p.err && in.p[first] == '{';
    struct token asked = object && is_string(p.version) ? p.version : (struct token){"\"" LATEST "\"", 7};

    if (!strcmp(command, "VERSION")) {
        struct buf out = {0};
        puts_(&out, "{\"cniVersion\":");
        put(&out, asked.start, asked.len);
        puts_(&out, ",\"supportedVersions\":[");
        for (size_t i = 0; i < N(SUPPORTED); i++) putf(&out, "%s\"%s\"", i ? "," : "", SUPPORTED[i]);
        puts_(&out, "]}\n");
        write_all(1, out.p, out.len);
        return 0;
    }
    if (p.err) return errorf(LATEST, 6, "cannot decode network configuration", "%s: char %zu", p.err, p.pos);
    if (!object) return error(LATEST, 6, "cannot decode network configuration", "not a JSON object", 17);

    const char *version = LATEST;
    size_t vlen;
    char *v = decode_string(asked.start, asked.len, &vlen);
    for (size_t i = 0; i < N(SUPPORTED); i++)
        if (vlen == strlen(SUPPORTED[i]) && !memcmp(v, SUPPORTED[i], vlen)) version = SUPPORTED[i];
    free(v);

    const char *keys[] = {"agentSocket", "stateDir"}, *defaults[] = {"/run/sknf/sknf.sock", "/var/lib/sknf"};
    struct token *tokens[] = {&p.socket, &p.state};
    char *where[2];
    size_t where_len[2];
    for (int i = 0; i < 2; i++) {
        struct token t = *tokens[i];
        if (!t.start) {
            where[i] = strdup(defaults[i]);
            where_len[i] = strlen(defaults[i]);
            continue;
        }
        where[i] = is_string(t) ? decode_string(t.start, t.len, &where_len[i]) : NULL;
        if (!where[i] || !where_len[i]) {
            char msg[64];
            snprintf(msg, sizeof msg, "%s must be a non-empty string", keys[i]);
            return errorf(version, 7, msg, "%s=%.*s", keys[i], (int)(t.len > 200 ? 200 : t.len), t.start);
        }
    }

    struct buf request = {0};
    puts_(&request, "{\"op\":\"cni\",\"env\":{");
    for (size_t i = 0; i < N(ENV); i++) {
        const char *val = getenv(ENV[i]);
        putf(&request, "%s\"%s\":", i ? "," : "", ENV[i]);
        quote(&request, val ? val : "", val ? strlen(val) : 0);
    }
    puts_(&request, "},\"config\":");
    put(&request, in.p, in.len); /* JSON, checked above */
    puts_(&request, "}");

    struct buf reply = {0};
    if (ask_agent(where[0], where_len[0], &request, &reply) == 0) {
        write_all(1, reply.p + 1, reply.len - 1);
        return reply.p[0] - '0';
    }
    if (strcmp(command, "DEL")) { /* the details name the socket: "<agentSocket>: <why>" */
        struct buf d = {0};
        put(&d, where[0], where_len[0]);
        puts_(&d, ": ");
        puts_(&d, why);
        return error(version, !strcmp(command, "STATUS") ? 50 : 11, "sknf agent unreachable", d.p, d.len);
    }
    char reason[sizeof why];
    memcpy(reason, why, sizeof why);
    if (park_del(where[1], where_len[1], &request))
        return error(version, 5, "agent unreachable and DEL could not be parked", why, strlen(why));
    fprintf(stderr, "sknf: agent unreachable (%s); DEL parked for replay\n", reason);
    return 0;
}
