// The intra-op thread pool of the compiled CPU step, and what runs on it: the window kernels
// (ops/cpu/window.c, pasted in before this file), GEMMs split into row blocks or batch
// entries each done by single-threaded BLAS, and the generated elementwise loops (which get
// sg_parallel_for's address). One pool per process, as torch's intra-op pool: BLAS's own
// threads stay asleep (each of ours calls BLAS with one thread), so no two pools fight for
// the cores. Workers spin briefly after a job (the next comes within microseconds in a
// step), then sleep on a futex. The caller takes parts too and steals the parts no worker
// has started, so a worker that is slow to wake never delays a job. A pool busy with another
// caller's job (ranks or pipeline stages on threads) runs the job on the caller alone.
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
int pthread_setname_np(pthread_t, const char*);    // glibc's, declared under _GNU_SOURCE only
#endif

typedef void (*sg_task)(void* ctx, long long begin, long long end);

#define SG_MAX_THREADS 256
#define SG_PARTS_PER_THREAD 4

static pthread_mutex_t sg_busy = PTHREAD_MUTEX_INITIALIZER;
static int sg_workers;                      // started (guarded by sg_busy)
static _Atomic uint32_t sg_gen;             // bumped per job; workers futex-wait on it
static _Atomic int sg_sleeping;
// a job's ticket: generation << 32 | parts << 16 | next part to claim
static _Atomic uint64_t sg_ticket;
static _Atomic int sg_done;                 // parts finished in the current job
static sg_task sg_fn;
static void* sg_ctx;
static long long sg_n;
static long sg_spin_ns = 200000;            // spin this long after a job before sleeping
static void (*sg_blas_set)(int);            // openblas_set_num_threads (global), when found
static int (*sg_blas_get)(void);
static pthread_mutex_t sg_blas_mu = PTHREAD_MUTEX_INITIALIZER;
static int sg_blas_users, sg_blas_saved;    // steps running; BLAS's count before the first
static _Atomic int sg_width;                // workers the current job may use (threads - 1)
// the GEMM library's thread count, where it is not NumPy's BLAS (the scipy-openblas64 wheel's):
// threadpoolctl, and so sg.set_num_threads, sets every BLAS loaded, this one too
static void (*sg_gemm_set)(int);
static int (*sg_gemm_get)(void);

static long long sg_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

// sleep until *word is no longer `seen` (or a spurious wake-up); wake every sleeper
static void sg_sleep(_Atomic uint32_t* word, uint32_t seen) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    const struct timespec nap = {0, 50000};        // elsewhere: poll every 50 us
    while (atomic_load(word) == seen) nanosleep(&nap, NULL);
#endif
}

static void sg_wake(_Atomic uint32_t* word) {
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static inline void sg_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// claim and run parts of the current job until none is left; returns how many it ran
static int sg_work(uint64_t t) {
    int ran = 0;
    for (;;) {
        const uint32_t parts = (uint32_t)(t >> 16) & 0xffff, k = (uint32_t)t & 0xffff;
        if (k >= parts) return ran;
        if (!atomic_compare_exchange_weak(&sg_ticket, &t, t + 1)) continue;
        const long long b = sg_n * k / parts, e = sg_n * (k + 1) / parts;
        sg_fn(sg_ctx, b, e);
        atomic_fetch_add(&sg_done, 1);
        ++ran;
        t = atomic_load(&sg_ticket);
    }
}

static void* sg_worker(void* arg) {
    // arg: the generation before the job that started it (so that it joins that job) << 8 | index
    const int index = (int)((uintptr_t)arg & 0xff);
    uint32_t seen = (uint32_t)((uintptr_t)arg >> 8);
    int idle = 0;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "sg-pool");
#endif
    for (;;) {
        long long since = 0;
        int spins = 0;
        uint32_t g;
        while ((g = atomic_load(&sg_gen)) == seen) {
            sg_relax();
            if (++spins < 64) continue;
            spins = 0;
            sched_yield();           // another thread of this process (the loader) goes first
            const long long now = sg_now_ns();
            if (!since) since = now;
            else if (idle || now - since > sg_spin_ns) {
                atomic_fetch_add(&sg_sleeping, 1);
                sg_sleep(&sg_gen, seen);
                atomic_fetch_sub(&sg_sleeping, 1);
                since = 0;
            }
        }
        seen = g;
        idle = index >= atomic_load(&sg_width);     // a narrower job: not this worker's
        if (!idle) sg_work(atomic_load(&sg_ticket));
    }
    return NULL;
}

static void sg_after_fork(void) {        // a forked child has none of the parent's threads
    pthread_mutex_init(&sg_busy, NULL);
    sg_workers = 0;
    atomic_store(&sg_sleeping, 0);
    pthread_mutex_init(&sg_blas_mu, NULL);        // a step on another thread of the parent
    if (sg_blas_users && sg_blas_set && sg_blas_saved != 1) sg_blas_set(sg_blas_saved);
    sg_blas_users = 0;
}

void sg_pool_init(void* blas_set, void* blas_get, long spin_ns) {
    static int once;
    sg_blas_set = (void (*)(int))blas_set;
    sg_blas_get = (int (*)(void))blas_get;
    if (spin_ns >= 0) sg_spin_ns = spin_ns;
    if (!once) {
        once = 1;
        pthread_atfork(NULL, NULL, sg_after_fork);
    }
}

// run fn(ctx, b, e) over [0, n) on up to `threads` threads, in parts of at least `grain`
void sg_parallel_for(int threads, long long n, long long grain, sg_task fn, void* ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    long long parts = (n + grain - 1) / grain;
    if (threads > SG_MAX_THREADS) threads = SG_MAX_THREADS;
    const long long most = (long long)threads * SG_PARTS_PER_THREAD;
    if (parts > most) parts = most;
    if (parts > 0xffff) parts = 0xffff;
    if (threads < 2 || parts < 2 || pthread_mutex_trylock(&sg_busy) != 0) {
        fn(ctx, 0, n);
        return;
    }
    while (sg_workers < threads - 1) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        const uintptr_t arg = (uintptr_t)atomic_load(&sg_gen) << 8 | (uintptr_t)sg_workers;
        const int failed = pthread_create(&t, &a, sg_worker, (void*)arg);
        pthread_attr_destroy(&a);
        if (failed) break;
        ++sg_workers;
    }
    sg_fn = fn;
    sg_ctx = ctx;
    sg_n = n;
    atomic_store(&sg_done, 0);
    atomic_store(&sg_width, threads - 1);
    const uint32_t gen = atomic_load(&sg_gen) + 1;
    atomic_store(&sg_ticket, ((uint64_t)gen << 32) | ((uint64_t)parts << 16));
    atomic_store(&sg_gen, gen);
    if (atomic_load(&sg_sleeping) > 0) sg_wake(&sg_gen);
    sg_work(atomic_load(&sg_ticket));
    while (atomic_load(&sg_done) < parts) sg_relax();
    pthread_mutex_unlock(&sg_busy);
}

// BLAS on one thread while any compiled step runs (the pool is the parallelism); counted, so
// that steps on several threads restore the user's count only when the last one ends
void sg_blas_enter(void) {
    if (!sg_blas_set) return;
    pthread_mutex_lock(&sg_blas_mu);
    if (sg_blas_users++ == 0) {
        sg_blas_saved = sg_blas_get();
        if (sg_blas_saved != 1) sg_blas_set(1);
    }
    pthread_mutex_unlock(&sg_blas_mu);
}
void sg_blas_exit(void) {
    if (!sg_blas_set) return;
    pthread_mutex_lock(&sg_blas_mu);
    if (--sg_blas_users == 0 && sg_blas_saved != 1) sg_blas_set(sg_blas_saved);
    pthread_mutex_unlock(&sg_blas_mu);
}
// BLAS's count as the user set it (the saved one while a step runs)
int sg_blas_threads(void) {
    if (!sg_blas_get) return -1;
    pthread_mutex_lock(&sg_blas_mu);
    const int n = sg_blas_users ? sg_blas_saved : sg_blas_get();
    pthread_mutex_unlock(&sg_blas_mu);
    return n;
}

// ---- the window kernels over planes ----------------------------------------------------------

typedef void (*sg_window_fn)(void** p, const long long* g, long long p0, long long p1);
typedef struct { sg_window_fn fn; void** p; const long long* g; } sg_window_job;

static void sg_window_task(void* ctx, long long b, long long e) {
    const sg_window_job* j = (const sg_window_job*)ctx;
    j->fn(j->p, j->g, b, e);
}

// sg_run_<kernel>(a): a = threads, double?, grain (planes per part), the 12 geometry values,
// then the kernel's pointers; its planes (N * C) split over the pool
#define SG_WINDOW_ENTRY(name)                                                                 \
    void sg_run_##name(const long long* a) {                                                  \
        sg_window_job j = {a[1] ? sg_##name##_f64 : sg_##name##_f32, (void**)(a + 15), a + 3}; \
        sg_parallel_for((int)a[0], a[3] * a[4], a[2], sg_window_task, &j);                    \
    }
// sg_run_ew(a): an eager elementwise kernel (ops.codegen.eager_source) over the pool; a =
// threads, the kernel, elements, grain, its geometry (8 values), the output and operands
void sg_run_ew(const long long* a) {
    sg_window_job j = {(sg_window_fn)a[1], (void**)(a + 12), a + 4};
    sg_parallel_for((int)a[0], a[2], a[3], sg_window_task, &j);
}

SG_WINDOW_ENTRY(im2col)
SG_WINDOW_ENTRY(col2im)
SG_WINDOW_ENTRY(maxpool)
SG_WINDOW_ENTRY(maxpool_grad)

// ---- GEMM split over the pool --------------------------------------------------------------
// C[b] = A[b] @ B[b] (row-major, C contiguous) for b < batch, each part some batch entries or
// a block of C's rows, each block one single-threaded BLAS call (CBLAS, 32- or 64-bit ints)

typedef void (*sg_sgemm32)(int, int, int, int, int, int, float, const float*, int,
                           const float*, int, float, float*, int);
typedef void (*sg_dgemm32)(int, int, int, int, int, int, double, const double*, int,
                           const double*, int, double, double*, int);
typedef void (*sg_sgemm64)(int, int, int, long long, long long, long long, float, const float*,
                           long long, const float*, long long, float, float*, long long);
typedef void (*sg_dgemm64)(int, int, int, long long, long long, long long, double,
                           const double*, long long, const double*, long long, double,
                           double*, long long);

typedef struct {
    void* fn; int dbl, i64, ta, tb;
    long long M, N, K, lda, ldb, sa, sb;
    long long blocks, cols;      // blocks per batch entry, of C's rows (cols 0) or columns
    const char* A; const char* B; char* C;
} sg_gemm_job;

// block k of `blocks` over n, in multiples of `align` (BLAS's kernels work in such tiles)
static void sg_block(long long n, long long blocks, long long k, long long align,
                     long long* b, long long* e) {
    long long size = (n + blocks - 1) / blocks;
    size = (size + align - 1) / align * align;
    *b = k * size < n ? k * size : n;
    *e = *b + size < n ? *b + size : n;
}

static void sg_gemm_task(void* ctx, long long b, long long e) {
    const sg_gemm_job* j = (const sg_gemm_job*)ctx;
    const long long size = j->dbl ? 8 : 4;
    const int ta = j->ta ? 112 : 111, tb = j->tb ? 112 : 111;
    for (long long u = b; u < e; ++u) {
        const long long batch = u / j->blocks, blk = u % j->blocks;
        long long r0 = 0, r1 = j->M, c0 = 0, c1 = j->N;
        if (j->cols) sg_block(j->N, j->blocks, blk, 16, &c0, &c1);
        else sg_block(j->M, j->blocks, blk, 8, &r0, &r1);
        if (r1 <= r0 || c1 <= c0) continue;
        // rows r0.. of op(A): NoTrans, row r0 starts at r0 * lda; Trans, at column r0; columns
        // c0.. of op(B): NoTrans, at column c0; Trans, at row c0
        const char* A = j->A + size * (batch * j->sa + r0 * (j->ta ? 1 : j->lda));
        const char* B = j->B + size * (batch * j->sb + c0 * (j->tb ? j->ldb : 1));
        char* C = j->C + size * (batch * j->M * j->N + r0 * j->N + c0);
        const long long m = r1 - r0, n = c1 - c0;
        if (j->i64) {
            if (j->dbl)
                ((sg_dgemm64)j->fn)(101, ta, tb, m, n, j->K, 1.0, (const double*)A, j->lda,
                                    (const double*)B, j->ldb, 0.0, (double*)C, j->N);
            else
                ((sg_sgemm64)j->fn)(101, ta, tb, m, n, j->K, 1.0f, (const float*)A, j->lda,
                                    (const float*)B, j->ldb, 0.0f, (float*)C, j->N);
        } else {
            if (j->dbl)
                ((sg_dgemm32)j->fn)(101, ta, tb, (int)m, (int)n, (int)j->K, 1.0,
                                    (const double*)A, (int)j->lda, (const double*)B,
                                    (int)j->ldb, 0.0, (double*)C, (int)j->N);
            else
                ((sg_sgemm32)j->fn)(101, ta, tb, (int)m, (int)n, (int)j->K, 1.0f,
                                    (const float*)A, (int)j->lda, (const float*)B, (int)j->ldb,
                                    0.0f, (float*)C, (int)j->N);
        }
    }
}

void sg_gemm_init(void* set, void* get) {
    sg_gemm_set = (void (*)(int))set;
    sg_gemm_get = (int (*)(void))get;
}

// args: threads, gemm fn, double?, 64-bit ints?, transA, transB, batch, M, N, K, lda, ldb,
// batch stride of A, of B (elements; 0 broadcasts), A, B, C
void sg_gemm(const long long* a) {
    sg_gemm_job j = {(void*)a[1], (int)a[2], (int)a[3], (int)a[4], (int)a[5], a[7], a[8], a[9],
                     a[10], a[11], a[12], a[13], 1, 0, (const char*)a[14], (const char*)a[15],
                     (char*)a[16]};
    if (sg_gemm_get && sg_gemm_get() != 1) sg_gemm_set(1);    // each block on one thread
    const int threads = (int)a[0];
    const long long batch = a[6];
    const double work = (double)batch * j.M * j.N * j.K;
    // A part does 2^17 multiply-adds or more (tens of microseconds; a hand-off to a spinning
    // pool thread costs about one): a smaller GEMM runs on the caller. Batch entries are
    // shared out whole; with fewer entries than threads, each is cut into blocks of C's rows
    // or columns, whichever makes the operand every block packs again (B for row blocks, A
    // for column blocks) the smaller: a 128x784 @ 784x512 step GEMM cut into 8 row blocks
    // packed B 8 times and took longer on 2 threads than whole on one. A GEMM whose C is
    // larger than A and B together (a weight gradient over a small batch: 512x128 @
    // 128x784) is cut into rows whatever it packs: each thread then writes one contiguous
    // part of C, where column blocks interleave both threads' writes along every row (that
    // GEMM took 0.62-0.63 ms on 2 threads in column blocks, 0.52-0.53 in row blocks).
    const double least = (double)(1 << 17);
    long long units = batch, grain = batch;
    if (threads > 1 && work >= 2 * least) {
        if (batch < threads) {
            const long long want = (threads + batch - 1) / batch;
            j.cols = j.M < j.N && ((double)j.M * j.N <= (double)j.K * (j.M + j.N) ||
                                   j.M / 8 < want);       // (rows enough for the blocks)
            const long long span = j.cols ? j.N / 16 : j.M / 8;
            j.blocks = want < span ? want : (span > 1 ? span : 1);
            units = batch * j.blocks;
        }
        const double per_unit = work / (double)units;
        grain = per_unit >= least ? 1 : (long long)(least / per_unit) + 1;
    }
    sg_parallel_for(threads, units, grain, sg_gemm_task, &j);
}

// ---- the optimizers' fused updates over the pool -----------------------------------------------
// one call updates k tensors in place (ops/cpu/update.c's rules), their elements one index
// space split over the pool: a part covers the pieces of the tensors in its range

typedef void (*sg_update_fn)(void* p, const void* g, void** s, long long i0, long long i1,
                             const double* h);
typedef struct {
    sg_update_fn fn; long long k; const long long* off; void** p; void** g; void** s;
    int states; const double* h;
} sg_update_job;

static void sg_update_task(void* ctx, long long b, long long e) {
    const sg_update_job* j = (const sg_update_job*)ctx;
    long long t = 0, lo = 0, hi = j->k;          // the tensor holding element b
    while (lo < hi) {
        const long long mid = (lo + hi) / 2;
        if (j->off[mid + 1] <= b) lo = mid + 1;
        else hi = mid;
    }
    for (t = lo; t < j->k && j->off[t] < e; ++t) {
        const long long i0 = b > j->off[t] ? b - j->off[t] : 0;
        const long long i1 = (e < j->off[t + 1] ? e : j->off[t + 1]) - j->off[t];
        void* s[2] = {j->states > 0 ? j->s[t] : NULL, j->states > 1 ? j->s[j->k + t] : NULL};
        if (i1 > i0) j->fn(j->p[t], j->g[t], s, i0, i1, j->h);
    }
}

// args: threads, rule (0 SGD, 1 Adam), double?, k, grain, hyper-parameters (double*), offsets
// (k + 1 int64: tensor t holds elements [off[t], off[t+1])), parameters, gradients (k
// pointers each), states (states * k pointers: the first state of every tensor, then the
// second), states
void sg_update(const long long* a) {
    static const sg_update_fn fns[2][2] = {
        {sg_sgd_f32, sg_sgd_f64},
        {sg_adam_f32, sg_adam_f64}};
    const long long k = a[3];
    const long long* off = (const long long*)a[6];
    sg_update_job j = {fns[a[1] ? 1 : 0][a[2] ? 1 : 0], k, off, (void**)a[7], (void**)a[8],
                       (void**)a[9], (int)a[10], (const double*)a[5]};
    sg_parallel_for((int)a[0], off[k], a[4], sg_update_task, &j);
}
