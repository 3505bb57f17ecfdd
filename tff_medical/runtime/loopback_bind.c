/* Preloaded into TFF's C++ worker, whose gRPC server has no authentication and no flag for its
 * listen address. The shim keeps every other user and host away from it:
 *  - the bind() of the worker's own port (TFF_MEDICAL_WORKER_PORT) becomes a bind to a Unix-domain
 *    socket at TFF_MEDICAL_WORKER_SOCKET, which the launcher puts in a directory only our uid may
 *    enter; so no TCP port exists that another local user could read from /proc/net and call;
 *  - any other bind to the wildcard address (0.0.0.0 or ::) becomes a bind to loopback;
 *  - an accepted Unix connection whose peer is another uid (SO_PEERCRED) is closed before gRPC
 *    sees it, in case the directory's permissions were ever loosened.
 * At load it also ties the worker to the Python process that started it (TFF_MEDICAL_PARENT_PID):
 * done here rather than in a Popen preexec_fn, because Python code between fork and exec in a
 * process with gRPC and TensorFlow threads can deadlock (seen: dlopen in the child hung). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);

__attribute__((constructor)) static void tie_to_parent(void) {
  const char *parent = getenv("TFF_MEDICAL_PARENT_PID");
  if (parent == NULL) return;
  int parent_pid = atoi(parent);
  unsetenv("TFF_MEDICAL_PARENT_PID"); /* Not for processes the worker may start. */
  /* The kernel kills us when the starting thread dies, even by kill -9. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  /* It may have died between fork and now, when no signal was armed. */
  if (getppid() != parent_pid) _exit(1);
  /* The Unix socket is then created owner-only: a second lock behind the 0700 directory. */
  umask(077);
}

static bind_fn real_bind(void) {
  static bind_fn fn = NULL;
  if (fn == NULL) fn = (bind_fn)dlsym(RTLD_NEXT, "bind");
  return fn;
}

static int worker_port(void) {
  const char *port = getenv("TFF_MEDICAL_WORKER_PORT");
  return port != NULL ? atoi(port) : -1;
}

/* Replaces the TCP socket `fd` by a Unix socket bound to `path`, keeping the descriptor number
 * and its flags (gRPC set O_NONBLOCK and FD_CLOEXEC before binding). */
static int bind_unix_instead(int fd, const char *path) {
  struct sockaddr_un un;
  if (strlen(path) >= sizeof(un.sun_path)) {
    errno = ENAMETOOLONG;
    return -1;
  }
  int status_flags = fcntl(fd, F_GETFL);
  int fd_flags = fcntl(fd, F_GETFD);
  int unix_fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (status_flags < 0 || fd_flags < 0 || unix_fd < 0) return -1;
  memset(&un, 0, sizeof(un));
  un.sun_family = AF_UNIX;
  strcpy(un.sun_path, path);
  if (real_bind()(unix_fd, (const struct sockaddr *)&un, sizeof(un)) != 0 ||
      dup2(unix_fd, fd) < 0) {
    int saved = errno;
    close(unix_fd);
    errno = saved;
    return -1;
  }
  close(unix_fd);
  fcntl(fd, F_SETFL, status_flags);
  fcntl(fd, F_SETFD, fd_flags);
  return 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  const char *unix_path = getenv("TFF_MEDICAL_WORKER_SOCKET");
  if (addr != NULL && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in in4;
    memcpy(&in4, addr, sizeof(in4));
    if (unix_path != NULL && ntohs(in4.sin_port) == worker_port())
      return bind_unix_instead(fd, unix_path);
    if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
      in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind()(fd, (const struct sockaddr *)&in4, sizeof(in4));
    }
  } else if (addr != NULL && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 in6;
    memcpy(&in6, addr, sizeof(in6));
    if (unix_path != NULL && ntohs(in6.sin6_port) == worker_port())
      return bind_unix_instead(fd, unix_path);
    if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof(in6addr_any)) == 0) {
      in6.sin6_addr = in6addr_loopback;
      return real_bind()(fd, (const struct sockaddr *)&in6, sizeof(in6));
    }
  }
  return real_bind()(fd, addr, len);
}

/* True if `fd` may be served: not a Unix socket, or one whose peer runs as our uid. */
static int is_ours(int fd) {
  struct sockaddr_storage local;
  socklen_t local_len = sizeof(local);
  if (getsockname(fd, (struct sockaddr *)&local, &local_len) != 0 || local.ss_family != AF_UNIX)
    return 1;
  struct ucred peer;
  socklen_t peer_len = sizeof(peer);
  return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) == 0 && peer.uid == getuid();
}

/* A foreign connection is closed and the next one taken, so gRPC never sees it and a connection
 * waiting behind it is not left unaccepted (gRPC waits for an edge after EAGAIN). */
int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  static accept4_fn fn = NULL;
  if (fn == NULL) fn = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
  socklen_t capacity = len != NULL ? *len : 0;
  for (;;) {
    int conn = fn(fd, addr, len, flags);
    if (conn < 0 || is_ours(conn)) return conn;
    close(conn);
    if (len != NULL) *len = capacity;
  }
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
  return accept4(fd, addr, len, 0);
}

/* Lets setuptools build this as an extension; the module is never imported. */
void *PyInit__loopback_bind(void) { return NULL; }
