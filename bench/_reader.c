/*
 * B2's reader: one POP3 session retrieving every message, in C, so that the
 * client is not what B2 measures (see bench/README.rst, "The reader").
 *
 *   _reader HOST PORT USER PASS [ROUNDS]
 *                                  log in, LIST, RETR each message (ROUNDS
 *                                  times over, default once), QUIT
 *   _reader --count CHUNK          count the multi-line bodies on stdin,
 *                                  reading at most CHUNK octets at a time
 *                                  (for tests: every split of every pattern)
 *
 * Each body is read into one preallocated buffer and counted as RFC 1939
 * sizes it: octets after un-stuffing, with CRLF line ends, without the
 * terminating line.  Lines ending in a bare LF are counted over the whole
 * body.  The reader only counts; bench/_creader.py checks the counts against
 * LIST with the same rules as the Python client (bench/_wire.py).
 *
 * Output, one line per body:  "N LISTED OCTETS LINES BARE_LF SECONDS"
 * (--count: N and LISTED are 0 and SECONDS is 0).  Exit status 0, or 1 with
 * a line on stderr when the server answered -ERR, closed, or broke framing.
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* 4 MiB: several times what one recv returns on loopback, so a read never
 * waits for room. */
#define BUFFER_SIZE (4 * 1024 * 1024)
#define MAX_MESSAGES 100000

static char *buffer;
static size_t start, end; /* unread octets are buffer[start:end] */
static size_t chunk = BUFFER_SIZE;
static int fd;

static void fail(const char *what) {
    fprintf(stderr, "%s\n", what);
    exit(1);
}

/* Read more octets after buffer[end], moving the unread ones to the front. */
static void fill(void) {
    if (start == end) {
        start = end = 0;
    } else if (end == BUFFER_SIZE) {
        memmove(buffer, buffer + start, end - start);
        end -= start;
        start = 0;
    }
    size_t room = BUFFER_SIZE - end;
    if (room > chunk) room = chunk;
    ssize_t got;
    do {
        got = read(fd, buffer + end, room);
    } while (got < 0 && errno == EINTR);
    if (got < 0) fail("read failed");
    if (got == 0) fail("connection closed");
    end += (size_t)got;
}

/* The next line without its CRLF, NUL-terminated in the buffer. */
static char *line(void) {
    size_t scanned = start;
    for (;;) {
        char *lf = memchr(buffer + scanned, '\n', end - scanned);
        if (lf != NULL) {
            char *text = buffer + start;
            if (lf == text || lf[-1] != '\r') fail("status line without CRLF");
            lf[-1] = '\0';
            start = (size_t)(lf - buffer) + 1;
            return text;
        }
        if (end - start >= BUFFER_SIZE / 2) fail("status line too long");
        scanned = end - start;
        fill();
        scanned += start;
    }
}

static void send_line(const char *text) {
    char out[512];
    int n = snprintf(out, sizeof out, "%s\r\n", text);
    if (n < 0 || (size_t)n >= sizeof out) fail("command too long");
    if (write(fd, out, (size_t)n) != n) fail("write failed");
}

static char *ok(const char *command) {
    send_line(command);
    char *status = line();
    if (strncmp(status, "+OK", 3) != 0) {
        fprintf(stderr, "%.8s: %.80s\n", command, status);
        exit(1);
    }
    return status;
}

struct body {
    long long octets, lines, bare_lf;
};

/*
 * Count one multi-line body from buffer[start:], reading as needed.  State
 * between reads: at_line_start (the previous octet was an LF, or the body
 * just began), dots (0, 1: the line began with ".", 2: with ".\r"), and
 * last_cr (the previous octet was a CR), so a pattern split anywhere by a
 * read is seen once.
 */
static struct body count_body(void) {
    struct body b = {0, 0, 0};
    long long seen = 0, stuffed = 0;
    int at_line_start = 1, dots = 0, last_cr = 0;
    for (;;) {
        if (start == end) fill();
        char *p = buffer + start, *stop = buffer + end;
        while (p < stop) {
            if (at_line_start || dots) {
                char c = *p;
                if (dots == 0) {
                    at_line_start = 0;
                    if (c == '.') {
                        dots = 1;
                        p++;
                        continue;
                    }
                } else if (dots == 1) {
                    if (c == '\r') {
                        dots = 2;
                        p++;
                        continue;
                    }
                    dots = 0; /* a stuffed line: its first "." is not content */
                    stuffed++;
                    last_cr = 0;
                } else {
                    dots = 0;
                    if (c == '\n') { /* ".\r\n": the end */
                        seen += (long long)(p + 1 - (buffer + start));
                        start = (size_t)(p + 1 - buffer);
                        /* the terminating line's 3 octets are not the body */
                        b.octets = seen - 3 - stuffed;
                        return b;
                    }
                    stuffed++; /* ".\r" then not LF: stuffed, the CR is content */
                    last_cr = 1;
                }
            }
            char *lf = memchr(p, '\n', (size_t)(stop - p));
            if (lf == NULL) {
                last_cr = stop[-1] == '\r';
                p = stop;
                break;
            }
            if (!(lf > p ? lf[-1] == '\r' : last_cr)) b.bare_lf++;
            b.lines++;
            at_line_start = 1;
            last_cr = 0;
            p = lf + 1;
        }
        seen += (long long)(p - (buffer + start));
        start = end;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int count_stdin(void) {
    fd = 0;
    for (;;) {
        if (start == end) {
            start = end = 0;
            ssize_t got = read(0, buffer, chunk);
            if (got <= 0) return 0;
            end = (size_t)got;
        }
        struct body b = count_body();
        printf("0 0 %lld %lld %lld 0\n", b.octets, b.lines, b.bare_lf);
    }
}

static long long sizes[MAX_MESSAGES + 1];

static int session(const char *host, int port, const char *user, const char *pass,
                   int rounds) {
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1) fail("bad host");
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) fail("socket failed");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) fail("connect failed");
    char command[512];
    char *greeting = line();
    if (strncmp(greeting, "+OK", 3) != 0) fail("greeting not +OK");
    snprintf(command, sizeof command, "USER %s", user);
    ok(command);
    snprintf(command, sizeof command, "PASS %s", pass);
    ok(command);
    ok("LIST");
    int count = 0;
    for (;;) {
        char *entry = line();
        if (strcmp(entry, ".") == 0) break;
        long number;
        long long size;
        if (sscanf(entry, "%ld %lld", &number, &size) != 2) fail("bad LIST line");
        if (number != count + 1 || count == MAX_MESSAGES) fail("LIST out of order");
        sizes[++count] = size;
    }
    for (int i = 0; i < count * rounds; i++) {
        int n = i % count + 1;
        snprintf(command, sizeof command, "RETR %d", n);
        double began = now();
        ok(command);
        struct body b = count_body();
        double seconds = now() - began;
        printf("%d %lld %lld %lld %lld %.9f\n", n, sizes[n], b.octets, b.lines, b.bare_lf,
               seconds);
    }
    ok("QUIT");
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    buffer = malloc(BUFFER_SIZE);
    if (buffer == NULL) fail("out of memory");
    if (argc == 3 && strcmp(argv[1], "--count") == 0) {
        chunk = (size_t)atol(argv[2]);
        if (chunk < 1 || chunk > BUFFER_SIZE) fail("bad chunk");
        return count_stdin();
    }
    if (argc != 5 && argc != 6) fail("usage: _reader HOST PORT USER PASS [ROUNDS] | --count CHUNK");
    int rounds = argc == 6 ? atoi(argv[5]) : 1;
    if (rounds < 1) fail("bad ROUNDS");
    return session(argv[1], atoi(argv[2]), argv[3], argv[4], rounds);
}
