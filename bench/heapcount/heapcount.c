/*
 * libpinbench-heap.so: live heap bytes of a process, read from outside.
 *
 * Loaded with LD_PRELOAD=libpinbench-heap.so and
 * PINBENCH_HEAP_COUNTER=FILE, it interposes malloc and its relatives, hands
 * every call to glibc's own allocator (__libc_malloc and friends) and keeps
 * the bytes of the blocks currently allocated (malloc_usable_size, so the
 * allocator's rounding is counted and frees subtract exactly what the
 * allocation added) in the first 8 bytes of FILE, a shared mapping, as a
 * native-endian int64. The bench reads FILE whenever it wants the figure:
 * allocator bytes, not RSS, so a few kilobytes of pages touched or given
 * back do not drown a figure of a few hundred bytes per pin.
 *
 * Without PINBENCH_HEAP_COUNTER (or if FILE cannot be mapped) it only
 * forwards. glibc only (its __libc_* entry points); bench/run.sh builds
 * it with `cc -shared` and checks it loads before the suite uses it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

/* Counted here until the constructor has mapped the file. */
static int64_t early;
static int64_t *live = &early;

__attribute__((constructor)) static void heapcount_init(void) {
    const char *path = getenv("PINBENCH_HEAP_COUNTER");
    if (path == NULL) {
        return;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    /* Children must not count into (let alone truncate) this process's file. */
    unsetenv("PINBENCH_HEAP_COUNTER");
    if (fd < 0) {
        return;
    }
    if (ftruncate(fd, 4096) == 0) {
        void *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map != MAP_FAILED) {
            int64_t *counter = map;
            __atomic_store_n(counter, __atomic_load_n(&early, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
            live = counter;
        }
    }
    close(fd);
}

static void *counted(void *p) {
    if (p != NULL) {
        __atomic_fetch_add(live, (int64_t)malloc_usable_size(p), __ATOMIC_RELAXED);
    }
    return p;
}

static void uncount(void *p) {
    if (p != NULL) {
        __atomic_fetch_sub(live, (int64_t)malloc_usable_size(p), __ATOMIC_RELAXED);
    }
}

void *malloc(size_t size) { return counted(__libc_malloc(size)); }

void free(void *p) {
    uncount(p);
    __libc_free(p);
}

void *calloc(size_t n, size_t size) { return counted(__libc_calloc(n, size)); }

void *realloc(void *p, size_t size) {
    size_t before = p != NULL ? malloc_usable_size(p) : 0;
    void *q = __libc_realloc(p, size);
    if (q != NULL || size == 0) {
        /* Moved or resized (or freed by realloc(p, 0)): the old block is gone. */
        __atomic_fetch_sub(live, (int64_t)before, __ATOMIC_RELAXED);
        counted(q);
    }
    return q;
}

void *reallocarray(void *p, size_t n, size_t size) {
    size_t bytes;
    if (__builtin_mul_overflow(n, size, &bytes)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, bytes);
}

void *memalign(size_t align, size_t size) { return counted(__libc_memalign(align, size)); }

void *aligned_alloc(size_t align, size_t size) { return memalign(align, size); }

int posix_memalign(void **out, size_t align, size_t size) {
    if (align < sizeof(void *) || (align & (align - 1)) != 0) {
        return EINVAL;
    }
    void *p = memalign(align, size);
    if (p == NULL) {
        return ENOMEM;
    }
    *out = p;
    return 0;
}

void *valloc(size_t size) { return memalign((size_t)sysconf(_SC_PAGESIZE), size); }

void *pvalloc(size_t size) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return memalign(page, (size + page - 1) & ~(page - 1));
}
