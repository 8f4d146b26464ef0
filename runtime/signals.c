// A rank's last words on a signal, said from the signal handler itself: prterun (Open MPI's
// mpirun), when signalled, passes SIGTERM on to the ranks and kills them about 0.2 s later,
// so "rank R was terminated by SIGTERM" written by a Python thread (runtime/world.py's
// watcher, which needs a core and the GIL) was lost under load. sg_say_on_signal installs a
// handler that writes the prepared line (once per process, unless the mark file exists: a
// peer's bad-input error ended the job and is its one line) and then runs the handler it
// replaced (Python's, which raises in the main thread as before). Only write(), access(),
// getpid() and an atomic exchange run in the handler: async-signal-safe.
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#define SG_SIGNALS 65
static char sg_said_line[SG_SIGNALS][128];
static char sg_said_mark[4096];
static int sg_said_fd = -1;
static pid_t sg_said_pid;                     // the rank: a forked child says nothing
static int sg_said;
static struct sigaction sg_said_old[SG_SIGNALS];

static void sg_say_handler(int sig) {
    const int saved = errno;
    if (sig > 0 && sig < SG_SIGNALS && sg_said_line[sig][0] && getpid() == sg_said_pid &&
        (!sg_said_mark[0] || access(sg_said_mark, F_OK) != 0) &&
        !__atomic_exchange_n(&sg_said, 1, __ATOMIC_SEQ_CST)) {
        const char* line = sg_said_line[sig];
        ssize_t left = (ssize_t)strlen(line);
        while (left > 0) {
            const ssize_t n = write(sg_said_fd, line, (size_t)left);
            if (n <= 0 && errno != EINTR) break;
            if (n > 0) { line += n; left -= n; }
        }
    }
    errno = saved;
    const struct sigaction* old = &sg_said_old[sig];
    if (!(old->sa_flags & SA_SIGINFO) && old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN)
        old->sa_handler(sig);
}

// say `line` on `fd` when `sig` arrives (before the handler now installed for it, a plain
// one: Python's); `mark`: a file whose existence silences it ("" none). 0, or -1 (errno) when
// the signal has no plain handler to chain to or sigaction failed.
int sg_say_on_signal(int sig, int fd, const char* line, const char* mark) {
    if (sig <= 0 || sig >= SG_SIGNALS || strlen(line) >= sizeof sg_said_line[0] ||
        strlen(mark) >= sizeof sg_said_mark) {
        errno = EINVAL;
        return -1;
    }
    struct sigaction now;
    if (sigaction(sig, NULL, &now) != 0) return -1;
    if (now.sa_handler == sg_say_handler) return 0;
    if ((now.sa_flags & SA_SIGINFO) || now.sa_handler == SIG_DFL || now.sa_handler == SIG_IGN) {
        errno = ENOTSUP;
        return -1;
    }
    strcpy(sg_said_line[sig], line);
    strcpy(sg_said_mark, mark);
    sg_said_fd = fd;
    sg_said_pid = getpid();
    sg_said_old[sig] = now;
    struct sigaction mine = now;              // the same mask and flags (SA_ONSTACK)
    mine.sa_handler = sg_say_handler;
    return sigaction(sig, &mine, NULL);
}

// whether a line was said (the Python watcher then says nothing)
int sg_said_on_signal(void) { return __atomic_load_n(&sg_said, __ATOMIC_SEQ_CST); }
