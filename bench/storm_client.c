/*
 * storm_client: one load-generator process of the cold-start storm (bench/storm.py).
 *
 * Each proxy in its slice gets its own TCP connection, its own TLS handshake (ALPN h2, the
 * server's chain verified against the trust bundle, host name checked, no session reuse)
 * and one gRPC call over HTTP/2 carrying its own authorization header and request body.
 * The full response is read, trailers included; the connection is then closed.
 *
 * One thread, one epoll loop, non-blocking sockets. At most --max-inflight proxies of this
 * process are between their connect attempt and their last response frame at any time.
 *
 * Server authentication: every handshake checks the server's CertificateVerify signature
 * (the server holds the key of the certificate it shows) and its certificate chain. A chain
 * goes through X509_verify_cert (trust bundle, validity, host name) the first time it is
 * seen; later connections that present exactly the same chain bytes reuse that verdict
 * (--verify cached, the default), as the chain verification is the client's own CPU, not
 * the server's, and costs about as much as the rest of the handshake. --verify full runs
 * X509_verify_cert on every connection.
 *
 * Protocol with the parent: after loading, print "ready"; wait for one line on stdin; run;
 * write the results file; print "done <user s> <system s> <max rss KiB> <full chain
 * verifications>", the CPU counted from the start signal to the end of the run. File formats are described in
 * bench/storm_workload.py.
 *
 * Build: gcc -O2 -o storm_client storm_client.c -lnghttp2 -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

enum { E_NONE, E_CONNECT, E_TLS, E_ALPN, E_HTTP2, E_RESET, E_TIMEOUT, E_CLOSED };
enum { S_IDLE, S_CONNECTING, S_HANDSHAKE, S_H2, S_DONE };

struct request {
    const uint8_t *auth;
    uint32_t auth_len;
    const uint8_t *body;
    uint32_t body_len;
};

struct proxy {
    uint32_t index;
    int fd;
    int state;
    SSL *ssl;
    nghttp2_session *h2;
    const struct request *req;
    uint32_t body_sent;
    int32_t grpc_status;
    int32_t http_status;
    uint32_t error;
    uint64_t t_start, t_connected, t_tls, t_end;
    uint8_t *resp;
    uint32_t resp_len, resp_cap;
    char text[200];
};

static SSL_CTX *ctx;
static struct sockaddr_in server;
static const char *server_name = "localhost";
static char authority[300];
static const char *path = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
static int epfd;
static nghttp2_session_callbacks *callbacks;

static void die(const char *what) {
    fprintf(stderr, "storm_client: %s\n", what);
    exit(2);
}

/* Chains that passed X509_verify_cert, as the concatenated DER of the certificates. */
#define MAX_VERIFIED 16
static int verify_cached = 1;
static uint8_t *verified[MAX_VERIFIED];
static size_t verified_len[MAX_VERIFIED];
static int n_verified;
static long full_verifications;

static size_t chain_der(X509_STORE_CTX *store, uint8_t *out, size_t cap) {
    size_t len = 0;
    X509 *leaf = X509_STORE_CTX_get0_cert(store);
    STACK_OF(X509) *chain = X509_STORE_CTX_get0_untrusted(store);
    int n = chain ? (int)sk_X509_num(chain) : 0;
    for (int i = -1; i < n; i++) {
        X509 *cert = i < 0 ? leaf : sk_X509_value(chain, i);
        int size = i2d_X509(cert, NULL);
        if (size <= 0 || len + (size_t)size > cap) return 0;
        uint8_t *at = out + len;
        i2d_X509(cert, &at);
        len += (size_t)size;
    }
    return len;
}

static int verify_chain(X509_STORE_CTX *store, void *arg) {
    (void)arg;
    static uint8_t der[65536];
    size_t len = verify_cached ? chain_der(store, der, sizeof der) : 0;
    for (int i = 0; len && i < n_verified; i++) {
        if (verified_len[i] == len && memcmp(verified[i], der, len) == 0) return 1;
    }
    full_verifications++;
    int ok = X509_verify_cert(store);
    if (ok == 1 && len && n_verified < MAX_VERIFIED) {
        verified[n_verified] = malloc(len);
        if (!verified[n_verified]) die("out of memory");
        memcpy(verified[n_verified], der, len);
        verified_len[n_verified++] = len;
    }
    return ok;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void fail(struct proxy *p, uint32_t error, const char *text) {
    if (p->state == S_DONE) return;
    p->error = error;
    p->state = S_DONE;
    if (text && !p->text[0]) snprintf(p->text, sizeof p->text, "%s", text);
}

static void fail_tls(struct proxy *p, uint32_t error) {
    char text[200];
    unsigned long code = ERR_get_error();
    long verify = p->ssl ? SSL_get_verify_result(p->ssl) : X509_V_OK;
    if (verify != X509_V_OK) {
        snprintf(text, sizeof text, "certificate: %s", X509_verify_cert_error_string(verify));
    } else if (code) {
        ERR_error_string_n(code, text, sizeof text);
    } else {
        snprintf(text, sizeof text, "%s", errno ? strerror(errno) : "connection closed");
    }
    ERR_clear_error();
    fail(p, error, text);
}

/* --- HTTP/2 callbacks ------------------------------------------------------------------ */

static ssize_t on_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags,
                       void *user) {
    (void)s;
    (void)flags;
    struct proxy *p = user;
    ERR_clear_error();
    int n = SSL_write(p->ssl, data, (int)len);
    if (n > 0) return n;
    int err = SSL_get_error(p->ssl, n);
    if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) return NGHTTP2_ERR_WOULDBLOCK;
    fail_tls(p, E_TLS);
    return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static ssize_t read_body(nghttp2_session *s, int32_t stream, uint8_t *buf, size_t len,
                         uint32_t *flags, nghttp2_data_source *source, void *user) {
    (void)s;
    (void)stream;
    (void)source;
    struct proxy *p = user;
    size_t left = p->req->body_len - p->body_sent;
    size_t n = left < len ? left : len;
    memcpy(buf, p->req->body + p->body_sent, n);
    p->body_sent += (uint32_t)n;
    if (p->body_sent == p->req->body_len) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user) {
    (void)s;
    (void)frame;
    (void)flags;
    struct proxy *p = user;
    if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
        p->http_status = atoi((const char *)value);
    } else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
        p->grpc_status = atoi((const char *)value);
    } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
        int shown = valuelen < sizeof p->text - 1 ? (int)valuelen : (int)sizeof p->text - 1;
        snprintf(p->text, sizeof p->text, "%.*s", shown, (const char *)value);
    }
    return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t stream, const uint8_t *data,
                   size_t len, void *user) {
    (void)s;
    (void)flags;
    (void)stream;
    struct proxy *p = user;
    if (p->resp_len + len > p->resp_cap) {
        uint32_t cap = p->resp_cap ? p->resp_cap : 4096;
        while (cap < p->resp_len + len) cap *= 2;
        p->resp = realloc(p->resp, cap);
        if (!p->resp) die("out of memory");
        p->resp_cap = cap;
    }
    memcpy(p->resp + p->resp_len, data, len);
    p->resp_len += (uint32_t)len;
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t stream, uint32_t code, void *user) {
    (void)s;
    (void)stream;
    struct proxy *p = user;
    p->t_end = now_ns();
    if (code != NGHTTP2_NO_ERROR) {
        char text[80];
        snprintf(text, sizeof text, "stream reset: %s", nghttp2_http2_strerror(code));
        fail(p, E_RESET, text);
    } else {
        p->state = S_DONE;
    }
    return 0;
}

/* --- one proxy ----------------------------------------------------------------------- */

static void start_call(struct proxy *p) {
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    SSL_get0_alpn_selected(p->ssl, &alpn, &alpn_len);
    if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) {
        fail(p, E_ALPN, "the server did not select ALPN h2");
        return;
    }
    if (nghttp2_session_client_new(&p->h2, callbacks, p) != 0) die("nghttp2_session_client_new");
    nghttp2_settings_entry settings[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
    nghttp2_submit_settings(p->h2, NGHTTP2_FLAG_NONE, settings, 1);
#define HDR(n, v, vl) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, (vl), NGHTTP2_NV_FLAG_NONE}
    nghttp2_nv headers[] = {
        HDR(":method", "POST", 4),
        HDR(":scheme", "https", 5),
        HDR(":path", path, strlen(path)),
        HDR(":authority", authority, strlen(authority)),
        HDR("content-type", "application/grpc", 16),
        HDR("te", "trailers", 8),
        HDR("authorization", p->req->auth, p->req->auth_len),
        HDR("user-agent", "meshca-storm/1", 14),
    };
#undef HDR
    nghttp2_data_provider body = {.source = {.ptr = NULL}, .read_callback = read_body};
    int32_t id = nghttp2_submit_request(p->h2, NULL, headers, sizeof headers / sizeof *headers,
                                        &body, p);
    if (id < 0) fail(p, E_HTTP2, nghttp2_strerror(id));
    p->state = S_H2;
}

/* Move bytes both ways until the socket would block or the call is over. */
static void pump(struct proxy *p) {
    uint8_t buf[16384];
    for (;;) {
        if (p->state == S_DONE) return;
        int rv = nghttp2_session_send(p->h2);
        if (rv != 0) {
            fail(p, E_HTTP2, nghttp2_strerror(rv));
            return;
        }
        if (p->state == S_DONE) return;
        ERR_clear_error();
        errno = 0;
        int n = SSL_read(p->ssl, buf, sizeof buf);
        if (n > 0) {
            ssize_t used = nghttp2_session_mem_recv(p->h2, buf, (size_t)n);
            if (used < 0) {
                fail(p, E_HTTP2, nghttp2_strerror((int)used));
                return;
            }
            continue;
        }
        int err = SSL_get_error(p->ssl, n);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            if (!nghttp2_session_want_read(p->h2) && !nghttp2_session_want_write(p->h2))
                fail(p, E_CLOSED, "the session ended without closing the stream");
            return;
        }
        if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && errno == 0)) {
            fail(p, E_CLOSED, "the server closed the connection before the response ended");
        } else {
            fail_tls(p, E_TLS);
        }
        return;
    }
}

static void handshake(struct proxy *p) {
    ERR_clear_error();
    errno = 0;
    int rv = SSL_do_handshake(p->ssl);
    if (rv == 1) {
        p->t_tls = now_ns();
        start_call(p);
        if (p->state == S_H2) pump(p);
        return;
    }
    int err = SSL_get_error(p->ssl, rv);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
    fail_tls(p, E_TLS);
}

static void on_connected(struct proxy *p) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(p, E_CONNECT, strerror(err));
        return;
    }
    p->t_connected = now_ns();
    p->ssl = SSL_new(ctx);
    if (!p->ssl) die("SSL_new");
    SSL_set_fd(p->ssl, p->fd);
    SSL_set_tlsext_host_name(p->ssl, server_name);
    SSL_set1_host(p->ssl, server_name);
    SSL_set_connect_state(p->ssl);
    p->state = S_HANDSHAKE;
    handshake(p);
}

static void begin(struct proxy *p) {
    p->t_start = now_ns();
    p->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p->fd < 0) {
        fail(p, E_CONNECT, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(p->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    p->state = S_CONNECTING;
    int rv = connect(p->fd, (struct sockaddr *)&server, sizeof server);
    if (rv < 0 && errno != EINPROGRESS) {
        fail(p, E_CONNECT, strerror(errno));
        return;
    }
    /* Edge-triggered, both directions, registered once: every step below runs until the
     * socket would block, so no edge is lost and no epoll_ctl(MOD) is needed. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = p};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, p->fd, &ev) != 0) die("epoll_ctl");
}

static void step(struct proxy *p) {
    switch (p->state) {
    case S_CONNECTING: on_connected(p); break;
    case S_HANDSHAKE: handshake(p); break;
    case S_H2: pump(p); break;
    default: break;
    }
}

static void finish(struct proxy *p) {
    if (p->t_end == 0 && p->error != E_NONE) p->t_end = now_ns();
    if (p->ssl) {
        SSL_set_quiet_shutdown(p->ssl, 1);
        SSL_free(p->ssl);
        p->ssl = NULL;
    }
    if (p->h2) {
        nghttp2_session_del(p->h2);
        p->h2 = NULL;
    }
    if (p->fd >= 0) {
        close(p->fd); /* also removes it from the epoll set */
        p->fd = -1;
    }
}

/* --- input, output ------------------------------------------------------------------- */

static uint8_t *read_file(const char *name, size_t *size) {
    FILE *f = fopen(name, "rb");
    if (!f) die("cannot open the requests file");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *data = malloc((size_t)n);
    if (!data || fread(data, 1, (size_t)n, f) != (size_t)n) die("cannot read the requests file");
    fclose(f);
    *size = (size_t)n;
    return data;
}

static uint32_t u32(const uint8_t *at) {
    return (uint32_t)at[0] | (uint32_t)at[1] << 8 | (uint32_t)at[2] << 16 |
           (uint32_t)at[3] << 24;
}

static void put(FILE *f, const void *data, size_t len) {
    if (fwrite(data, 1, len, f) != len) die("cannot write the results file");
}

static void write_results(const char *name, struct proxy *proxies, uint32_t count) {
    FILE *f = fopen(name, "wb");
    if (!f) die("cannot create the results file");
    put(f, "STORMRS1", 8);
    put(f, &count, 4);
    for (uint32_t i = 0; i < count; i++) {
        struct proxy *p = &proxies[i];
        uint16_t text_len = (uint16_t)strlen(p->text);
        put(f, &p->index, 4);
        put(f, &p->grpc_status, 4);
        put(f, &p->http_status, 4);
        put(f, &p->error, 4);
        put(f, &p->t_start, 8);
        put(f, &p->t_connected, 8);
        put(f, &p->t_tls, 8);
        put(f, &p->t_end, 8);
        put(f, &p->resp_len, 4);
        if (p->resp_len) put(f, p->resp, p->resp_len);
        put(f, &text_len, 2);
        put(f, p->text, text_len);
    }
    if (fclose(f) != 0) die("cannot write the results file");
}

static void usage(void) {
    die("usage: storm_client --requests FILE --first N --count N --port P --ca FILE "
        "--out FILE [--host 127.0.0.1] [--server-name localhost] [--max-inflight N] "
        "[--timeout S] [--verify cached|full]");
}

int main(int argc, char **argv) {
    const char *requests_file = NULL, *ca_file = NULL, *out_file = NULL, *host = "127.0.0.1";
    long first = -1, count = -1, port = -1, max_inflight = 1000000, timeout_s = 120;
    static struct option options[] = {
        {"requests", required_argument, 0, 'r'}, {"first", required_argument, 0, 'f'},
        {"count", required_argument, 0, 'c'},    {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},     {"ca", required_argument, 0, 'a'},
        {"out", required_argument, 0, 'o'},      {"server-name", required_argument, 0, 's'},
        {"max-inflight", required_argument, 0, 'm'},
        {"timeout", required_argument, 0, 't'},  {"verify", required_argument, 0, 'v'},
        {0, 0, 0, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'r': requests_file = optarg; break;
        case 'f': first = atol(optarg); break;
        case 'c': count = atol(optarg); break;
        case 'h': host = optarg; break;
        case 'p': port = atol(optarg); break;
        case 'a': ca_file = optarg; break;
        case 'o': out_file = optarg; break;
        case 's': server_name = optarg; break;
        case 'm': max_inflight = atol(optarg); break;
        case 't': timeout_s = atol(optarg); break;
        case 'v':
            if (strcmp(optarg, "cached") == 0) verify_cached = 1;
            else if (strcmp(optarg, "full") == 0) verify_cached = 0;
            else usage();
            break;
        default: usage();
        }
    }
    if (!requests_file || !ca_file || !out_file || first < 0 || count < 0 || port <= 0 ||
        max_inflight <= 0)
        usage();

    /* Up to the hard limit: one descriptor per proxy in flight, plus a few. */
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }

    size_t size;
    uint8_t *data = read_file(requests_file, &size);
    if (size < 12 || memcmp(data, "STORMRQ1", 8) != 0) die("not a storm requests file");
    uint32_t total = u32(data + 8);
    if ((uint64_t)first + (uint64_t)count > total) die("--first/--count exceed the file");
    struct request *requests = calloc(total, sizeof *requests);
    size_t at = 12;
    for (uint32_t i = 0; i < total; i++) {
        if (at + 4 > size) die("truncated requests file");
        requests[i].auth_len = u32(data + at);
        requests[i].auth = data + at + 4;
        at += 4 + requests[i].auth_len;
        if (at + 4 > size) die("truncated requests file");
        requests[i].body_len = u32(data + at);
        requests[i].body = data + at + 4;
        at += 4 + requests[i].body_len;
        if (at > size) die("truncated requests file");
    }

    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1) die("--host must be an IPv4 address");
    snprintf(authority, sizeof authority, "%s:%ld", server_name, port);

    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) die("cannot load --ca");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_cert_verify_callback(ctx, verify_chain, NULL);
    /* Every proxy is a new client: no session cache, no tickets, nothing resumed. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    static const unsigned char alpn[] = {2, 'h', '2'};
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn);

    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_send_callback(callbacks, on_send);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);

    struct proxy *proxies = calloc((size_t)count, sizeof *proxies);
    if (!proxies) die("out of memory");
    for (long i = 0; i < count; i++) {
        proxies[i].index = (uint32_t)(first + i);
        proxies[i].req = &requests[first + i];
        proxies[i].fd = -1;
        proxies[i].grpc_status = -1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) die("no start signal on stdin");
    struct rusage at_start;
    getrusage(RUSAGE_SELF, &at_start);

    uint64_t deadline = now_ns() + (uint64_t)timeout_s * 1000000000u;
    long next = 0, inflight = 0, done = 0;
    struct epoll_event events[512];
    while (done < count) {
        while (inflight < max_inflight && next < count) {
            struct proxy *p = &proxies[next++];
            inflight++;
            begin(p);
            if (p->state == S_DONE) {
                finish(p);
                inflight--;
                done++;
            }
        }
        int n = epoll_wait(epfd, events, 512, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct proxy *p = events[i].data.ptr;
            if (p->state == S_DONE) continue;
            step(p);
            if (p->state == S_DONE) {
                finish(p);
                inflight--;
                done++;
            }
        }
        if (now_ns() > deadline) {
            for (long i = 0; i < next; i++) {
                struct proxy *p = &proxies[i];
                if (p->state != S_DONE) {
                    fail(p, E_TIMEOUT, "no complete response before the storm's deadline");
                    finish(p);
                    done++;
                }
            }
            for (long i = next; i < count; i++) {
                fail(&proxies[i], E_TIMEOUT, "never started: the storm's deadline passed");
                done++;
            }
            next = count;
        }
    }

    write_results(out_file, proxies, (uint32_t)count);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("done %.6f %.6f %ld %ld\n",
           (usage.ru_utime.tv_sec - at_start.ru_utime.tv_sec) +
               (usage.ru_utime.tv_usec - at_start.ru_utime.tv_usec) / 1e6,
           (usage.ru_stime.tv_sec - at_start.ru_stime.tv_sec) +
               (usage.ru_stime.tv_usec - at_start.ru_stime.tv_usec) / 1e6,
           usage.ru_maxrss, full_verifications);
    fflush(stdout);
    return 0;
}
