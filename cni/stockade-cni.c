/* stockade-cni, the thin CNI plugin: hands the whole invocation to the agent.
 *
 * A runtime starts one plugin process per container and waits for it. The Python
 * plugin (`stockade.cni.plugin`) spends most of an ADD starting an interpreter and
 * importing itself; this one reads the invocation (the CNI_* variables and the
 * network configuration on stdin), sends it to the agent as one `cni.exec` request
 * on the agent's socket, and prints what the agent's copy of the same plugin code
 * answered, with its exit status. Nothing here interprets the configuration.
 *
 * Whenever the agent cannot take the call (no socket, an agent without cni.exec, a
 * busy or failing agent, a configuration naming another agent) it runs the Python
 * plugin instead, with the same stdin and environment: that one is the reference,
 * and it knows how to report every failure in the spec's terms.
 *
 * The agent runs the plugin in this process's network namespace, so the host side is
 * plumbed where the runtime meant, as the Python plugin would have. The request carries
 * (SCM_RIGHTS) this process's network and mount namespaces and its root directory:
 * an agent in a container of its own (no shared PID or mount namespace, as in the
 * DaemonSet) enters the first, and through the other two checks that it sees the
 * paths it is given (CNI_NETNS, the data directory) as this process does, or hands
 * the call back. The pid is sent too, for an agent from before.
 *
 * The socket: the configuration's top-level "socket", else $STOCKADE_SOCKET, else
 * /run/stockade/agent.sock (as the Python plugin chooses). The Python plugin:
 * $STOCKADE_CNI_PYTHON, else the path compiled in (STOCKADE_CNI_PYTHON).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef STOCKADE_CNI_PYTHON
#define STOCKADE_CNI_PYTHON "/usr/local/bin/stockade-cni"
#endif
#define DEFAULT_SOCKET "/run/stockade/agent.sock"
#define MAX_INPUT (16 << 20)
#define MAX_ANSWER (64 << 20)
#define TIMEOUT_SECONDS 90 /* as the Python plugin waits for the agent */

extern char **environ;

struct buf {
	char *data;
	size_t len, cap;
};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (b->len + n + 1 > cap)
			cap *= 2;
		char *p = realloc(b->data, cap);
		if (!p) {
			perror("stockade-cni");
			exit(100);
		}
		b->data = p;
		b->cap = cap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* A JSON string; 0 when the bytes are not valid UTF-8 (the agent's decoder refuses
 * those, so the Python plugin gets the call). */
static int put_json_string(struct buf *b, const unsigned char *s, size_t n)
{
	put(b, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = s[i];
		char esc[8];
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			put(b, esc, 2);
		} else if (c < 0x20) {
			snprintf(esc, sizeof esc, "\\u%04x", c);
			put(b, esc, 6);
		} else if (c < 0x80) {
			put(b, (const char *)&c, 1);
		} else {
			size_t len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;
			if (!len || i + len > n || c > 0xf4)
				return 0;
			for (size_t k = 1; k < len; k++)
				if ((s[i + k] & 0xc0) != 0x80)
					return 0;
			put(b, (const char *)s + i, len);
			i += len - 1;
		}
	}
	put(b, "\"", 1);
	return 1;
}

/* ---- reading the answer: just enough JSON for {"v":1,"ok":true,"result":{...}} ---- */

struct cursor {
	const char *p, *end;
};

static void ws(struct cursor *c)
{
	while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\t' || *c->p == '\r'))
		c->p++;
}

static int hex4(const char *p, unsigned *out)
{
	unsigned v = 0;
	for (int i = 0; i < 4; i++) {
		char h = p[i];
		v <<= 4;
		if (h >= '0' && h <= '9') v |= (unsigned)(h - '0');
		else if (h >= 'a' && h <= 'f') v |= (unsigned)(h - 'a' + 10);
		else if (h >= 'A' && h <= 'F') v |= (unsigned)(h - 'A' + 10);
		else return 0;
	}
	*out = v;
	return 1;
}

static void put_utf8(struct buf *b, unsigned cp)
{
	char o[4];
	size_t n;
	if (cp < 0x80) { o[0] = (char)cp; n = 1; }
	else if (cp < 0x800) { o[0] = (char)(0xc0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
	else if (cp < 0x10000) {
		o[0] = (char)(0xe0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		o[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
	} else {
		o[0] = (char)(0xf0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
	}
	put(b, o, n);
}

/* A string at the cursor, decoded into out (NULL: skipped). */
static int string(struct cursor *c, struct buf *out)
{
	if (c->p >= c->end || *c->p != '"')
		return 0;
	c->p++;
	while (c->p < c->end && *c->p != '"') {
		if (*c->p != '\\') {
			if (out) put(out, c->p, 1);
			c->p++;
			continue;
		}
		if (c->end - c->p < 2)
			return 0;
		char e = c->p[1];
		c->p += 2;
		const char *simple = strchr("\"\\/bfnrt", e);
		if (e && simple) {
			static const char to[] = "\"\\/\b\f\n\r\t";
			if (out) put(out, &to[simple - "\"\\/bfnrt"], 1);
		} else if (e == 'u') {
			unsigned cp, lo;
			if (c->end - c->p < 4 || !hex4(c->p, &cp))
				return 0;
			c->p += 4;
			if (cp >= 0xd800 && cp < 0xdc00 && c->end - c->p >= 6 && c->p[0] == '\\' &&
			    c->p[1] == 'u' && hex4(c->p + 2, &lo) && lo >= 0xdc00 && lo < 0xe000) {
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				c->p += 6;
			}
			if (out) put_utf8(out, cp);
		} else {
			return 0;
		}
	}
	if (c->p >= c->end)
		return 0;
	c->p++;
	return 1;
}

static int skip_value(struct cursor *c, int depth);

static int skip_container(struct cursor *c, char open, char close, int depth)
{
	c->p++;
	ws(c);
	if (c->p < c->end && *c->p == close) { c->p++; return 1; }
	for (;;) {
		ws(c);
		if (open == '{') {
			if (!string(c, NULL)) return 0;
			ws(c);
			if (c->p >= c->end || *c->p != ':') return 0;
			c->p++;
		}
		if (!skip_value(c, depth + 1)) return 0;
		ws(c);
		if (c->p < c->end && *c->p == ',') { c->p++; continue; }
		if (c->p < c->end && *c->p == close) { c->p++; return 1; }
		return 0;
	}
}

static int skip_value(struct cursor *c, int depth)
{
	ws(c);
	if (c->p >= c->end || depth > 64)
		return 0;
	if (*c->p == '"') return string(c, NULL);
	if (*c->p == '{') return skip_container(c, '{', '}', depth);
	if (*c->p == '[') return skip_container(c, '[', ']', depth);
	while (c->p < c->end && strchr("-+.0123456789eEtrufalsn", *c->p))
		c->p++;
	return 1;
}

/* Each member of the object at the cursor: its key into key, the cursor on its value. */
typedef int (*member_fn)(struct cursor *c, const char *key, void *ctx);

static int members(struct cursor *c, member_fn fn, void *ctx)
{
	ws(c);
	if (c->p >= c->end || *c->p != '{') return 0;
	c->p++;
	ws(c);
	if (c->p < c->end && *c->p == '}') { c->p++; return 1; }
	for (;;) {
		struct buf key = {0};
		ws(c);
		if (!string(c, &key)) { free(key.data); return 0; }
		ws(c);
		if (c->p >= c->end || *c->p != ':') { free(key.data); return 0; }
		c->p++;
		ws(c);
		int ok = fn(c, key.data ? key.data : "", ctx);
		free(key.data);
		if (!ok) return 0;
		ws(c);
		if (c->p < c->end && *c->p == ',') { c->p++; continue; }
		if (c->p < c->end && *c->p == '}') { c->p++; return 1; }
		return 0;
	}
}

struct answer {
	int ok, has_code, fallback;
	long code;
	struct buf out, err;
};

static int result_member(struct cursor *c, const char *key, void *ctx)
{
	struct answer *a = ctx;
	if (!strcmp(key, "code")) {
		char *end;
		a->code = strtol(c->p, &end, 10);
		if (end == c->p) return 0;
		a->has_code = 1;
		c->p = end;
		return 1;
	}
	if (!strcmp(key, "stdout")) return string(c, &a->out);
	if (!strcmp(key, "stderr")) return string(c, &a->err);
	if (!strcmp(key, "fallback")) a->fallback = 1;
	return skip_value(c, 1);
}

static int top_member(struct cursor *c, const char *key, void *ctx)
{
	struct answer *a = ctx;
	if (!strcmp(key, "ok")) {
		a->ok = c->end - c->p >= 4 && !strncmp(c->p, "true", 4);
		return skip_value(c, 1);
	}
	if (!strcmp(key, "result") && a->ok)
		return members(c, result_member, a);
	return skip_value(c, 1);
}

/* ---- the two ways out ---- */

static void python(char **argv, const struct buf *input)
{
	const char *exe = getenv("STOCKADE_CNI_PYTHON");
	if (!exe || !*exe)
		exe = STOCKADE_CNI_PYTHON;
	int fd = memfd_create("stockade-cni-stdin", MFD_CLOEXEC);
	if (fd >= 0) {
		size_t off = 0;
		while (off < input->len) {
			ssize_t n = write(fd, input->data + off, input->len - off);
			if (n <= 0) break;
			off += (size_t)n;
		}
		if (off == input->len && lseek(fd, 0, SEEK_SET) == 0 && dup2(fd, 0) == 0) {
			argv[0] = (char *)exe;
			execv(exe, argv);
		}
	}
	/* the spec's error shape, code 999 would say nothing: 11 is "try again later" */
	printf("{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"cannot run the stockade CNI "
	       "plugin\",\"details\":\"%s: %s\"}\n", exe, strerror(errno));
	exit(1);
}

static const char *socket_of(const struct buf *input)
{
	const char *env = getenv("STOCKADE_SOCKET");
	static struct buf found;
	struct cursor c = {input->data ? input->data : "", input->data ? input->data + input->len : ""};
	ws(&c);
	if (c.p < c.end && *c.p == '{') {
		c.p++;
		for (;;) {
			struct buf key = {0};
			ws(&c);
			if (!string(&c, &key)) { free(key.data); break; }
			ws(&c);
			if (c.p >= c.end || *c.p != ':') { free(key.data); break; }
			c.p++;
			ws(&c);
			int is_socket = key.data && !strcmp(key.data, "socket");
			free(key.data);
			if (is_socket && c.p < c.end && *c.p == '"') {
				if (string(&c, &found) && found.data && *found.data)
					return found.data;
				break;
			}
			if (!skip_value(&c, 1)) break;
			ws(&c);
			if (c.p < c.end && *c.p == ',') { c.p++; continue; }
			break;
		}
	}
	return env && *env ? env : DEFAULT_SOCKET;
}

int main(int argc, char **argv)
{
	(void)argc;
	struct buf input = {0};
	char chunk[65536];
	ssize_t n;
	while ((n = read(0, chunk, sizeof chunk)) > 0) {
		put(&input, chunk, (size_t)n);
		if (input.len > MAX_INPUT)
			python(argv, &input);
	}
	if (!input.data)
		put(&input, "", 0);

	struct buf req = {0};
	puts_(&req, "{\"v\":1,\"op\":\"cni.exec\",\"args\":{\"env\":{");
	int first = 1;
	for (char **e = environ; *e; e++) {
		const char *eq = strchr(*e, '=');
		if (!eq) continue;
		if (!first) puts_(&req, ",");
		first = 0;
		if (!put_json_string(&req, (const unsigned char *)*e, (size_t)(eq - *e)))
			python(argv, &input);
		puts_(&req, ":");
		if (!put_json_string(&req, (const unsigned char *)eq + 1, strlen(eq + 1)))
			python(argv, &input);
	}
	puts_(&req, "},\"stdin\":");
	if (!put_json_string(&req, (const unsigned char *)input.data, input.len))
		python(argv, &input);
	/* the agent runs the plugin in this process's network namespace, as if here */
	int fds[3] = {open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC),
		      open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC),
		      open("/", O_PATH | O_DIRECTORY | O_CLOEXEC)};
	int passing = fds[0] >= 0 && fds[1] >= 0 && fds[2] >= 0;
	snprintf(chunk, sizeof chunk, ",\"pid\":%d%s}}\n", (int)getpid(),
		 passing ? ",\"fds\":[\"net\",\"mnt\",\"root\"]" : "");
	puts_(&req, chunk);

	const char *path = socket_of(&input);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof addr.sun_path)
		python(argv, &input);
	strcpy(addr.sun_path, path);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct timeval tv = {.tv_sec = TIMEOUT_SECONDS};
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0)
		python(argv, &input);
	for (size_t off = 0; off < req.len;) {
		if (off == 0 && passing) {
			/* the descriptors travel with the request's first bytes */
			union {
				char space[CMSG_SPACE(sizeof fds)];
				struct cmsghdr align;
			} control;
			memset(&control, 0, sizeof control);
			struct iovec iov = {.iov_base = req.data, .iov_len = req.len};
			struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
					     .msg_control = control.space,
					     .msg_controllen = sizeof control.space};
			struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof fds);
			memcpy(CMSG_DATA(cm), fds, sizeof fds);
			n = sendmsg(s, &msg, MSG_NOSIGNAL);
		} else {
			n = write(s, req.data + off, req.len - off);
		}
		if (n <= 0)
			python(argv, &input);
		off += (size_t)n;
	}
	for (int i = 0; i < 3; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	struct buf ans = {0};
	while (!ans.len || ans.data[ans.len - 1] != '\n') {
		n = read(s, chunk, sizeof chunk);
		if (n <= 0 || ans.len + (size_t)n > MAX_ANSWER)
			python(argv, &input);
		put(&ans, chunk, (size_t)n);
	}
	close(s);

	struct answer a = {0};
	struct cursor c = {ans.data, ans.data + ans.len};
	if (!members(&c, top_member, &a) || !a.ok || a.fallback || !a.has_code)
		python(argv, &input);
	if (a.out.len) fwrite(a.out.data, 1, a.out.len, stdout);
	if (a.err.len) fwrite(a.err.data, 1, a.err.len, stderr);
	fflush(stdout);
	fflush(stderr);
	return (int)a.code;
}
