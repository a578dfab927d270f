/*
 * powerloss.so: an LD_PRELOAD shim that keeps a "durable image" of the
 * files of one directory: what a disk that loses every unsynced write
 * would hold if the power went now. Used by tests/power_loss.rs and
 * relay/tests/power_loss.rs (see tests/support/powerloss/mod.rs).
 *
 * Environment:
 *   POWERLOSS_WATCH  the watched directory (absolute, canonical path)
 *   POWERLOSS_IMAGE  the image directory: a file WATCH/x is kept as IMAGE/x
 *   POWERLOSS_FAIL   optional: while a file exists at this path, every sync
 *                    of a watched file fails with EIO (and changes nothing)
 *   POWERLOSS_DELAY_US optional: each sync of a watched file takes this
 *                    long (a slow disk), between its snapshot and its end
 *   POWERLOSS_CRASH  optional: when a file exists at this path, the next
 *                    sync of a watched file whose snapshot is not already
 *                    its image (something written since its last sync)
 *                    takes its snapshot, waits POWERLOSS_DELAY_US and 200 ms
 *                    more, then SIGKILLs the process before it ends: the
 *                    power fails in the middle of a (long) flush that had
 *                    something to flush (no other sync ends meanwhile)
 *   POWERLOSS_LOG    optional: a line per sync of a watched file is
 *                    appended here ("<kind> <ok|err> <bytes> <path> <thread>
 *                    <monotonic seconds>")
 *
 * fsync and fdatasync of a regular file under WATCH: the file's content is
 * read (through /proc/self/fd/N) when the call starts, the real call runs,
 * and if it succeeds that snapshot replaces the file's image (written to a
 * temporary file and renamed, so an image is always whole). Snapshots are
 * numbered in the order they are taken and an older one never replaces a
 * newer one; syncs run concurrently between their snapshot and their end.
 * Writes made while a sync runs are not in its snapshot (pessimistic: they
 * may or may not have reached a real disk). Syncs of a directory under
 * WATCH are passed through and logged; sync_file_range, syncfs and sync
 * are passed through, logged, and add nothing to the image (nothing here
 * relies on them: if something did, the tests would see data missing).
 *
 * unlink and unlinkat of a file under WATCH remove its image at the next
 * successful sync of any watched file or directory (as on ext4, where an
 * fsync commits the file system's pending metadata changes with it).
 *
 * Limits of the model: a file is in the image from its first successful
 * sync on, whether or not its directory was synced after it was created
 * (a real file system may lose a new file's name until then); rename and
 * truncate reach the image only through a later sync of the file; writes
 * through O_SYNC/O_DSYNC descriptors or msync are not seen (nothing under
 * test uses them: strace shows SQLite calling fsync and the relay's
 * WalSync fdatasync, nothing else); calls that bypass the dynamic linker
 * (a static binary, a raw syscall) are not seen. Unsynced writes are all
 * lost, never partly kept or reordered. A failed sync (POWERLOSS_FAIL)
 * leaves the written data in the file, so a later successful sync makes
 * it durable: Linux may instead drop dirty pages whose writeback failed,
 * which this does not model.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_sync_file_range)(int, off64_t, off64_t, unsigned int);
static int (*real_syncfs)(int);
static void (*real_sync)(void);

static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);

/* Image paths of unlinked watched files, removed at the next sync. */
#define MAX_PENDING 64
static char pending[MAX_PENDING][4096];
static int pending_count;

static void *next(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        fprintf(stderr, "powerloss: no next %s\n", name);
        abort();
    }
    return f;
}

/* The path of fd relative to WATCH (in rel), or 0 if it is not under it. */
static int watched(int fd, char *rel, size_t size) {
    const char *watch = getenv("POWERLOSS_WATCH");
    if (!watch || !*watch)
        return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return 0;
    path[n] = 0;
    size_t w = strlen(watch);
    if (strncmp(path, watch, w) != 0 || (path[w] != '/' && path[w] != 0))
        return 0;
    const char *r = path[w] == '/' ? path + w + 1 : path + w;
    if (strlen(r) >= size)
        return 0;
    strcpy(rel, r);
    return 1;
}

static void note(const char *kind, int result, long long bytes, const char *rel) {
    const char *log = getenv("POWERLOSS_LOG");
    if (!log || !*log)
        return;
    char line[4300];
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int n = snprintf(line, sizeof line, "%s %s %lld %s %ld %lld.%06ld\n", kind,
                     result == 0 ? "ok" : "err", bytes, rel, (long)gettid(),
                     (long long)now.tv_sec, now.tv_nsec / 1000);
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    if (write(fd, line, (size_t)n) < 0) {
        /* nothing to do */
    }
    close(fd);
}

static int flag(const char *name) {
    const char *path = getenv(name);
    return path && *path && access(path, F_OK) == 0;
}

static int failing(void) {
    return flag("POWERLOSS_FAIL");
}

/* The whole content of fd's file, read through a new descriptor (fd may be
 * write-only); *len is set. NULL on failure. */
static char *snapshot(int fd, long long *len) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    int in = open(link, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return NULL;
    struct stat st;
    if (fstat(in, &st) != 0) {
        close(in);
        return NULL;
    }
    size_t cap = (size_t)st.st_size + 1, used = 0;
    char *buf = malloc(cap);
    if (!buf) {
        close(in);
        return NULL;
    }
    for (;;) {
        if (used == cap) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger) {
                free(buf);
                close(in);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t n = pread(in, buf + used, cap - used, (off_t)used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(buf);
            close(in);
            return NULL;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    close(in);
    *len = (long long)used;
    return buf;
}

static void make_parents(char *path) {
    for (char *p = path + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(path, 0700);
            *p = '/';
        }
    }
}

/* Replaces IMAGE/rel with the snapshot; aborts if it cannot (a test must
 * not go on with an image that is not what was synced). */
static void publish(const char *rel, const char *buf, long long len) {
    const char *image = getenv("POWERLOSS_IMAGE");
    if (!image || !*image) {
        fprintf(stderr, "powerloss: POWERLOSS_IMAGE is not set\n");
        abort();
    }
    char dest[8192], tmp[8300];
    snprintf(dest, sizeof dest, "%s/%s", image, rel);
    snprintf(tmp, sizeof tmp, "%s.powerloss-tmp", dest);
    make_parents(dest);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) {
        perror("powerloss: image");
        abort();
    }
    long long done = 0;
    while (done < len) {
        ssize_t n = write(out, buf + done, (size_t)(len - done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            perror("powerloss: image write");
            abort();
        }
        done += n;
    }
    close(out);
    if (rename(tmp, dest) != 0) {
        perror("powerloss: image rename");
        abort();
    }
}

/* Called with the lock held, after a successful sync. */
static void apply_unlinks(void) {
    const char *image = getenv("POWERLOSS_IMAGE");
    for (int i = 0; i < pending_count; i++) {
        char dest[8192];
        snprintf(dest, sizeof dest, "%s/%s", image ? image : "", pending[i]);
        if (real_unlink(dest) != 0 && errno != ENOENT) {
            perror("powerloss: image unlink");
            abort();
        }
        note("unlink(applied)", 0, -1, pending[i]);
    }
    pending_count = 0;
}

/* Whether IMAGE/rel holds exactly these bytes. */
static int in_image(const char *rel, const char *buf, long long len) {
    const char *image = getenv("POWERLOSS_IMAGE");
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", image ? image : "", rel);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    long long image_len = 0;
    char *bytes = snapshot(fd, &image_len);
    close(fd);
    int same = bytes && image_len == len && memcmp(bytes, buf, (size_t)len) == 0;
    free(bytes);
    return same;
}

/* Snapshots taken so far (their order), and the power is failing. */
static unsigned long long sequence;
static int crashing;

/* The sequence number of the snapshot in IMAGE/rel (0: none yet). */
#define MAX_FILES 64
static char published_name[MAX_FILES][4096];
static unsigned long long published[MAX_FILES];
static int published_count;

static unsigned long long *published_seq(const char *rel) {
    for (int i = 0; i < published_count; i++)
        if (strcmp(published_name[i], rel) == 0)
            return &published[i];
    if (published_count == MAX_FILES) {
        fprintf(stderr, "powerloss: too many files\n");
        abort();
    }
    snprintf(published_name[published_count], sizeof published_name[0], "%s", rel);
    published[published_count] = 0;
    return &published[published_count++];
}

static void slow_disk(void) {
    const char *delay = getenv("POWERLOSS_DELAY_US");
    long us = delay ? atol(delay) : 0;
    if (us > 0) {
        struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

/* Once the power is failing, no sync ends (called with the lock held). */
static void wait_while_crashing(void) {
    while (crashing) {
        pthread_mutex_unlock(&lock);
        struct timespec wait = {1, 0};
        nanosleep(&wait, NULL);
        pthread_mutex_lock(&lock);
    }
}

static int durable_sync(int fd, int (*real)(int), const char *kind) {
    char rel[4096];
    if (!watched(fd, rel, sizeof rel))
        return real(fd);
    pthread_mutex_lock(&lock);
    int saved;
    int result;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        wait_while_crashing();
        if (failing()) {
            result = -1;
            saved = EIO;
        } else {
            result = real(fd);
            saved = errno;
        }
        if (result == 0)
            apply_unlinks();
        note(kind, result, -1, *rel ? rel : ".");
    } else if (failing()) {
        result = -1;
        saved = EIO;
        note(kind, result, 0, rel);
    } else {
        long long len = 0;
        char *buf = snapshot(fd, &len);
        if (!buf) {
            perror("powerloss: snapshot");
            abort();
        }
        unsigned long long seq = ++sequence;
        int crash = !crashing && flag("POWERLOSS_CRASH") && !in_image(rel, buf, len);
        if (crash)
            crashing = 1;
        /* The disk works on this sync while other syncs start. */
        pthread_mutex_unlock(&lock);
        slow_disk();
        if (crash) {
            /* A flush that hangs 200 ms more before the power goes: what
             * was answered before it has time to reach its client. */
            struct timespec hang = {0, 200 * 1000 * 1000};
            while (nanosleep(&hang, &hang) != 0 && errno == EINTR) {
            }
            note("crash", 0, len, rel);
            kill(getpid(), SIGKILL);
        }
        result = real(fd);
        saved = errno;
        pthread_mutex_lock(&lock);
        wait_while_crashing();
        if (result == 0) {
            apply_unlinks();
            unsigned long long *last = published_seq(rel);
            /* A later snapshot of this file is already the image. */
            if (seq > *last) {
                publish(rel, buf, len);
                *last = seq;
            }
        }
        free(buf);
        note(kind, result, len, rel);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return result;
}

int fsync(int fd) {
    if (!real_fsync)
        real_fsync = next("fsync");
    return durable_sync(fd, real_fsync, "fsync");
}

int fdatasync(int fd) {
    if (!real_fdatasync)
        real_fdatasync = next("fdatasync");
    return durable_sync(fd, real_fdatasync, "fdatasync");
}

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags) {
    if (!real_sync_file_range)
        real_sync_file_range = next("sync_file_range");
    char rel[4096];
    int result = real_sync_file_range(fd, offset, nbytes, flags);
    if (watched(fd, rel, sizeof rel))
        note("sync_file_range(ignored)", result, -1, rel);
    return result;
}

int syncfs(int fd) {
    if (!real_syncfs)
        real_syncfs = next("syncfs");
    note("syncfs(ignored)", 0, -1, "-");
    return real_syncfs(fd);
}

void sync(void) {
    if (!real_sync)
        real_sync = next("sync");
    note("sync(ignored)", 0, -1, "-");
    real_sync();
}

/* If the file at dirfd/path is under WATCH, queues its image's removal. */
static void unlinking(int dirfd, const char *path) {
    const char *watch = getenv("POWERLOSS_WATCH");
    if (!watch || !*watch)
        return;
    char parent[4096], resolved[4096], full[8192];
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (path[0] == '/') {
        snprintf(parent, sizeof parent, "%.*s", (int)(slash - path), path);
        if (!*parent)
            strcpy(parent, "/");
    } else {
        char dir[64] = ".";
        if (dirfd != AT_FDCWD)
            snprintf(dir, sizeof dir, "/proc/self/fd/%d", dirfd);
        if (slash)
            snprintf(parent, sizeof parent, "%s/%.*s", dir, (int)(slash - path), path);
        else
            snprintf(parent, sizeof parent, "%s", dir);
    }
    if (!realpath(parent, resolved))
        return;
    snprintf(full, sizeof full, "%s/%s", resolved, base);
    size_t w = strlen(watch);
    if (strncmp(full, watch, w) != 0 || full[w] != '/')
        return;
    pthread_mutex_lock(&lock);
    if (pending_count == MAX_PENDING) {
        fprintf(stderr, "powerloss: too many unlinks before a sync\n");
        abort();
    }
    snprintf(pending[pending_count++], sizeof pending[0], "%s", full + w + 1);
    note("unlink(pending)", 0, -1, full + w + 1);
    pthread_mutex_unlock(&lock);
}

int unlink(const char *path) {
    if (!real_unlink)
        real_unlink = next("unlink");
    int result = real_unlink(path);
    if (result == 0) {
        int saved = errno;
        unlinking(AT_FDCWD, path);
        errno = saved;
    }
    return result;
}

int unlinkat(int dirfd, const char *path, int flags) {
    if (!real_unlinkat)
        real_unlinkat = next("unlinkat");
    if (!real_unlink)
        real_unlink = next("unlink");
    int result = real_unlinkat(dirfd, path, flags);
    if (result == 0 && !(flags & AT_REMOVEDIR)) {
        int saved = errno;
        unlinking(dirfd, path);
        errno = saved;
    }
    return result;
}
