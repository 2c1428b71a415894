/*
 * edgekit/runtime/_fastpath.c -- the per-decode-step fast path of the edgekit runtime.
 *
 * Part 1 is a small C library with no Python in it (llama.h style: an opaque handle made
 * from a params struct, create/free pairs, integer return codes). Part 2 is the CPython
 * module edgekit.runtime._fastpath wrapping it; it reads every vector through the buffer
 * protocol (float32 only) and needs neither NumPy's C API nor NumPy itself.
 *
 * The algorithm is specified in sampling_ref.py (the NumPy reference); "step N" below
 * refers to its numbered steps. Parity with the reference is exact for the sampled token
 * because every comparison and sum uses the same doubles in the same order. That needs:
 *   -ffp-contract=off   GCC otherwise fuses a*b+c into one FMA on aarch64 (Jetson), which
 *                       rounds differently from numpy's separate multiply and add;
 *   no -ffast-math      sums must stay in the documented order.
 * -fno-trapping-math is harmless (no FP traps are enabled) and lets GCC vectorize the
 * branch-free exp loops. x86-64 builds also carry an AVX2 copy of the two exp kernels,
 * picked at import time with __builtin_cpu_supports: same operations, same results, and the
 * module still runs on CPUs without AVX2 (no -march flags are needed or wanted).
 *
 * Return codes (every ek_* function that can fail returns one of these):
 */
#define EK_OK 0
#define EK_ERR_NAN (-1)        /* a NaN, or +inf in logits, or an inf in probabilities   */
#define EK_ERR_SIZE (-2)       /* a vector's length differs from the sampler's vocab size */
#define EK_ERR_PARAM (-3)      /* a parameter is out of range (ek_params_check says which) */
#define EK_ERR_NOMEM (-4)      /* allocation failed                                       */
#define EK_ERR_MASKED (-5)     /* nothing to sample: every logit -inf, or zero total mass  */
#define EK_ERR_TOKEN (-6)      /* a token id outside [0, vocab)                           */
#define EK_ERR_NEGATIVE (-7)   /* a negative probability                                  */
#define EK_ERR_ZERO_DRAFT (-8) /* q[draft] == 0: the draft model cannot have drafted it   */
#define EK_ERR_EMPTY (-9)      /* a latency series has no samples yet                     */
/* Functions that report *where* a problem is fill an ek_diag (may be NULL): the index of
 * the offending element and which argument it is in (0 = first vector, 1 = second). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================= Part 1: C library */

typedef struct { int64_t index; int arg; } ek_diag;

typedef struct {
    double temperature;        /* 0 = greedy, else [1e-6, 1e6]                   */
    int32_t top_k;             /* 0 = off                                         */
    double top_p;              /* (0, 1], 1 = off                                 */
    double min_p;              /* [0, 1], 0 = off                                 */
    double repetition_penalty; /* [1e-6, 1e6], 1 = off (CTRL)                     */
    double frequency_penalty;  /* [-1e6, 1e6], 0 = off (OpenAI)                   */
    double presence_penalty;   /* [-1e6, 1e6], 0 = off (OpenAI)                   */
    int32_t penalty_last_n;    /* history window for penalties, -1 = all, 0 = off */
    uint64_t seed;             /* xoshiro256** seed (via splitmix64)              */
} ek_sampler_params;

/* The bounds keep every intermediate finite in double (|logit| <= 3.4e38), and keep
 * distinct float32 logits distinct after scaling (sample_top_k relies on it). */
#define EK_TEMP_MIN 1e-6
#define EK_TEMP_MAX 1e6
#define EK_PENALTY_MAX 1e6
#define EK_EXP_FLUSH (-708.0) /* exp(x) for x < -708 is taken as 0 (the reference does the same) */

static void ek_set_diag(ek_diag *d, int64_t index, int arg) {
    if (d) d->index = index, d->arg = arg;
}

ek_sampler_params ek_sampler_default_params(void) {
    ek_sampler_params p = {1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 64, 0};
    return p;
}

/* EK_OK, or EK_ERR_PARAM with a message naming the field (msg may be NULL). */
int ek_params_check(const ek_sampler_params *p, char *msg, size_t msg_len) {
    const struct { const char *name; double value, lo, hi; int ok; } rules[] = {
        {"temperature", p->temperature, EK_TEMP_MIN, EK_TEMP_MAX,
         p->temperature == 0.0 || (p->temperature >= EK_TEMP_MIN && p->temperature <= EK_TEMP_MAX)},
        {"top_k", p->top_k, 0, INT32_MAX, p->top_k >= 0},
        {"top_p", p->top_p, 0, 1, p->top_p > 0.0 && p->top_p <= 1.0},
        {"min_p", p->min_p, 0, 1, p->min_p >= 0.0 && p->min_p <= 1.0},
        {"repetition_penalty", p->repetition_penalty, EK_TEMP_MIN, EK_PENALTY_MAX,
         p->repetition_penalty >= EK_TEMP_MIN && p->repetition_penalty <= EK_PENALTY_MAX},
        {"frequency_penalty", p->frequency_penalty, -EK_PENALTY_MAX, EK_PENALTY_MAX,
         fabs(p->frequency_penalty) <= EK_PENALTY_MAX},
        {"presence_penalty", p->presence_penalty, -EK_PENALTY_MAX, EK_PENALTY_MAX,
         fabs(p->presence_penalty) <= EK_PENALTY_MAX},
        {"penalty_last_n", p->penalty_last_n, -1, INT32_MAX, p->penalty_last_n >= -1},
    };
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
        if (rules[i].ok) continue;
        if (msg)
            snprintf(msg, msg_len,
                     i == 0   ? "%s must be 0 (greedy) or in [%g, %g], got %.17g"
                     : i == 2 ? "%s must be in (%g, %g], got %.17g"
                              : "%s must be in [%g, %g], got %.17g",
                     rules[i].name, rules[i].lo, rules[i].hi, rules[i].value);
        return EK_ERR_PARAM;
    }
    return EK_OK;
}

/* ---- RNG: xoshiro256** 1.0 seeded by four splitmix64 outputs (Blackman & Vigna) */

static inline uint64_t ek_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static void ek_rng_seed(uint64_t s[4], uint64_t seed) {
    for (int i = 0; i < 4; i++) {
        uint64_t z = (seed += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        s[i] = z ^ (z >> 31);
    }
}

static uint64_t ek_rng_next(uint64_t s[4]) {
    const uint64_t result = ek_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t;
    s[3] = ek_rotl(s[3], 45);
    return result;
}

/* 53 random bits -> [0, 1); exact, so Python's (x >> 11) * 2**-53 gives the same double. */
static double ek_rng_double(uint64_t s[4]) { return (double)(ek_rng_next(s) >> 11) * 0x1.0p-53; }

/* ---- exp for x <= 0, branch-free so that GCC vectorizes the loops calling it.
 * x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite, two-part ln2), degree-13 Taylor polynomial
 * in r, 2^n built from the exponent bits. Within 1 ulp of glibc's exp on [-708, 0] (and
 * numpy's), exp(0) == 1 exactly: min-p relies on the top token's weight being 1. */
static inline __attribute__((always_inline)) double ek_exp_neg(double x) {
    static const double c[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                 1.0 / 6.0, 0.5, 1.0, 1.0};
    const double magic = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    double xc = x < EK_EXP_FLUSH ? EK_EXP_FLUSH : x;
    double t = xc * 1.4426950408889634 + magic, n = t - magic;
    double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10, p = c[0];
    for (int k = 1; k < 14; k++) p = p * r + c[k];
    uint64_t bits;
    double scale;
    memcpy(&bits, &t, 8); /* the low bits of t hold n (two's complement) */
    bits = (bits + 1023u) << 52;
    memcpy(&scale, &bits, 8);
    return x < EK_EXP_FLUSH ? 0.0 : p * scale;
}

/* w[i] = exp(v[i] - m), elementwise (step 4 on the dense path). */
static inline __attribute__((always_inline)) void exp_shift_body(const double *v, double m, double *w, size_t n) {
    for (size_t i = 0; i < n; i++) w[i] = ek_exp_neg(v[i] - m);
}

/* exp for the confidence statistics only: the same reduction as ek_exp_neg with a degree-11
 * polynomial (truncation error < 1e-14 relative on |r| <= ln2/2), with fused multiply-adds
 * when the kernel has them. The statistics need 1e-6 against the reference, not bit-parity
 * (nothing is drawn from them), so this trades the sampler's exact-1-ulp exp for ~30 %
 * fewer operations; the sampler keeps ek_exp_neg. */
static inline __attribute__((always_inline)) double ek_exp_neg_stat(double x, int use_fma) {
    static const double c[12] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,
                                 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    const double magic = 6755399441055744.0;
    double xc = x < EK_EXP_FLUSH ? EK_EXP_FLUSH : x;
    double t = xc * 1.4426950408889634 + magic, n = t - magic;
    double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10, p = c[0];
    /* written out: a loop here is not unrolled before vectorization and blocks it */
#define EK_MAD(k) p = use_fma ? __builtin_fma(p, r, c[k]) : p * r + c[k]
    EK_MAD(1); EK_MAD(2); EK_MAD(3); EK_MAD(4); EK_MAD(5); EK_MAD(6);
    EK_MAD(7); EK_MAD(8); EK_MAD(9); EK_MAD(10); EK_MAD(11);
#undef EK_MAD
    uint64_t bits;
    double scale;
    memcpy(&bits, &t, 8);
    bits = (bits + 1023u) << 52;
    memcpy(&scale, &bits, 8);
    return x < EK_EXP_FLUSH ? 0.0 : p * scale;
}

/* Confidence sums over the logits: Z = sum e^d, S = sum e^d * d, d = x - m1 <= 0.
 * Blocks of 256: a vectorized exp loop into a stack buffer, then four interleaved
 * accumulators (the order is fixed by this source, so a given build gives the same sums).
 * -inf gives e = 0 and adds 0 to S because d is clamped to -708 before the product. */
static inline __attribute__((always_inline)) void conf_body(const float *l, size_t n, double m, double out[2], int use_fma) {
    double z[4] = {0, 0, 0, 0}, s[4] = {0, 0, 0, 0}, be[256], bs[256];
    for (size_t i = 0; i < n; i += 256) {
        size_t b = n - i < 256 ? n - i : 256, j = 0;
        for (size_t k = 0; k < b; k++) {
            double d = (double)l[i + k] - m, dc = d < EK_EXP_FLUSH ? EK_EXP_FLUSH : d;
            be[k] = ek_exp_neg_stat(d, use_fma);
            bs[k] = be[k] * dc;
        }
        for (; j + 4 <= b; j += 4)
            for (int k = 0; k < 4; k++) z[k] += be[j + k], s[k] += bs[j + k];
        for (; j < b; j++) z[0] += be[j], s[0] += bs[j];
    }
    out[0] = (z[0] + z[1]) + (z[2] + z[3]);
    out[1] = (s[0] + s[1]) + (s[2] + s[3]);
}

/* The two largest logits (m2 == m1 when the maximum occurs twice); returns the index of
 * the first NaN or +inf, or -1. The portable version is a plain scan. */
static int64_t top2_base(const float *l, size_t n, float *m1o, float *m2o) {
    float m1 = -INFINITY, m2 = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        float x = l[i];
        if (!(x <= FLT_MAX)) return (int64_t)i;
        if (x > m2) m2 = x > m1 ? m1 : x, m1 = x > m1 ? x : m1;
    }
    *m1o = m1, *m2o = m2;
    return -1;
}

static void exp_shift_base(const double *v, double m, double *w, size_t n) { exp_shift_body(v, m, w, n); }
static void conf_base(const float *l, size_t n, double m, double out[2]) { conf_body(l, n, m, out, 0); }
static void (*ek_exp_shift)(const double *, double, double *, size_t) = exp_shift_base;
static void (*ek_conf_sums)(const float *, size_t, double, double[2]) = conf_base;
static int64_t (*ek_top2)(const float *, size_t, float *, float *) = top2_base;
static const char *ek_kernel = "baseline";

#if defined(__x86_64__) && defined(__GNUC__) && !defined(EK_NO_DISPATCH)
#include <immintrin.h>
__attribute__((target("avx2"))) static void exp_shift_avx2(const double *v, double m, double *w, size_t n) {
    exp_shift_body(v, m, w, n);
}
__attribute__((target("avx2,fma"))) static void conf_avx2(const float *l, size_t n, double m, double out[2]) {
    conf_body(l, n, m, out, 1);
}
/* Per-lane top two over 16 floats at a time (two independent chains: max has a 4-cycle
 * latency), NaN/+inf flagged by an unordered compare; the 32 lane candidates and the tail
 * then go through the scalar rule. The top two of a union are among the top two of its
 * parts, so this equals top2_base; a flagged vector is located by top2_base itself. */
__attribute__((target("avx2"))) static int64_t top2_avx2(const float *l, size_t n, float *m1o, float *m2o) {
    const __m256 big = _mm256_set1_ps(FLT_MAX), ninf = _mm256_set1_ps(-INFINITY);
    __m256 a1 = ninf, a2 = ninf, b1 = ninf, b2 = ninf, bad = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 x = _mm256_loadu_ps(l + i), y = _mm256_loadu_ps(l + i + 8);
        bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(x, big, _CMP_NLE_UQ), _mm256_cmp_ps(y, big, _CMP_NLE_UQ)));
        a2 = _mm256_max_ps(a2, _mm256_min_ps(a1, x)), a1 = _mm256_max_ps(a1, x);
        b2 = _mm256_max_ps(b2, _mm256_min_ps(b1, y)), b1 = _mm256_max_ps(b1, y);
    }
    if (_mm256_movemask_ps(bad)) return top2_base(l, n, m1o, m2o);
    float lanes[32];
    _mm256_storeu_ps(lanes, a1), _mm256_storeu_ps(lanes + 8, a2);
    _mm256_storeu_ps(lanes + 16, b1), _mm256_storeu_ps(lanes + 24, b2);
    float m1 = -INFINITY, m2 = -INFINITY;
    for (int k = 0; k < 32; k++) {
        float x = lanes[k];
        if (x > m2) m2 = x > m1 ? m1 : x, m1 = x > m1 ? x : m1;
    }
    float t1, t2;
    int64_t at = top2_base(l + i, n - i, &t1, &t2);
    if (at >= 0) return (int64_t)i + at;
    float tail[2] = {t1, t2};
    for (int k = 0; k < 2; k++) {
        float x = tail[k];
        if (x > m2) m2 = x > m1 ? m1 : x, m1 = x > m1 ? x : m1;
    }
    *m1o = m1, *m2o = m2;
    return -1;
}
static void ek_pick_kernels(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) ek_exp_shift = exp_shift_avx2, ek_top2 = top2_avx2, ek_kernel = "avx2";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ek_conf_sums = conf_avx2, ek_kernel = "avx2+fma";
}
#else
static void ek_pick_kernels(void) {}
#endif

/* Index of the first NaN or +inf (-inf is a legal mask), or -1. Blocked so that the
 * common all-good case runs as a vectorized OR over each block. */
static int64_t ek_first_bad_logit(const float *l, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        int bad = 0;
        for (size_t j = 0; j < 64; j++) bad |= !(l[i + j] <= FLT_MAX);
        if (bad) break;
    }
    for (; i < n; i++)
        if (!(l[i] <= FLT_MAX)) return (int64_t)i;
    return -1;
}

/* ---- candidates, rank order and selection */

typedef struct { double v, w; int32_t id; } ek_cand; /* v: logit after steps 1-2, w: exp(v - max) */

/* Rank order: v descending, then id ascending (ties go to the lowest id). */
static int cmp_rank(const void *a, const void *b) {
    const ek_cand *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}
static int cmp_id(const void *a, const void *b) {
    const ek_cand *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}
static inline int ek_worse(const ek_cand *a, const ek_cand *b) {
    return a->v < b->v || (a->v == b->v && a->id > b->id);
}
static inline void ek_swap(ek_cand *a, ek_cand *b) {
    ek_cand t = *a;
    *a = *b, *b = t;
}

/* A heap with the worst candidate (in rank order) at the root. */
static void heap_down(ek_cand *h, size_t n, size_t i) {
    for (;;) {
        size_t c = 2 * i + 1, worst = i;
        if (c < n && ek_worse(&h[c], &h[worst])) worst = c;
        if (c + 1 < n && ek_worse(&h[c + 1], &h[worst])) worst = c + 1;
        if (worst == i) return;
        ek_swap(&h[i], &h[worst]);
        i = worst;
    }
}
static void heap_up(ek_cand *h, size_t i) {
    for (; i > 0 && ek_worse(&h[i], &h[(i - 1) / 2]); i = (i - 1) / 2) ek_swap(&h[i], &h[(i - 1) / 2]);
}

/* The best m finite entries of v (float or double) into h in rank order; returns how many.
 * Ids are scanned upwards, so a newcomer beats the root only if strictly greater: on a
 * tie the root has the lower id and stays. O(n log m), mostly one compare per token. */
#define EK_SELECT_TOP(NAME, T)                                                 \
    static size_t NAME(const T *v, size_t n, size_t m, ek_cand *h) {           \
        size_t len = 0, i = 0;                                                 \
        for (; i < n && len < m; i++)                                          \
            if (v[i] > -INFINITY) {                                            \
                h[len].v = v[i], h[len].w = 0, h[len].id = (int32_t)i;         \
                heap_up(h, len++);                                             \
            }                                                                  \
        for (double root = len ? h[0].v : INFINITY; i < n; i++)                \
            if (v[i] > root) {                                                 \
                h[0].v = v[i], h[0].id = (int32_t)i;                           \
                heap_down(h, len, 0);                                          \
                root = h[0].v;                                                 \
            }                                                                  \
        qsort(h, len, sizeof *h, cmp_rank);                                    \
        return len;                                                            \
    }
EK_SELECT_TOP(select_top_f32, float)
EK_SELECT_TOP(select_top_f64, double)

/* ---- sampler */

typedef struct ek_sampler {
    ek_sampler_params p;
    int32_t n_vocab;
    uint64_t rng[4];
    uint32_t *counts; /* per token; all zero between calls                  */
    int32_t *touched; /* distinct tokens in the penalty window this step     */
    double *pen;      /* their penalized logits (step 1, before temperature) */
    size_t n_touched;
    double *v, *w;    /* dense path (no top-k), allocated on first use       */
    ek_cand *cand, *tmp;
    size_t cand_cap;
} ek_sampler;

void ek_sampler_free(ek_sampler *s) {
    if (s) free(s->counts), free(s->touched), free(s->pen), free(s->v), free(s->w), free(s->cand), free(s->tmp);
    free(s);
}

/* NULL on failure with *err (may be NULL) set to EK_ERR_PARAM or EK_ERR_NOMEM. */
ek_sampler *ek_sampler_create(int32_t n_vocab, const ek_sampler_params *params, int *err) {
    int rc = n_vocab < 1 ? EK_ERR_PARAM : ek_params_check(params, NULL, 0);
    ek_sampler *s = rc == EK_OK ? calloc(1, sizeof *s) : NULL;
    if (s) {
        s->counts = calloc((size_t)n_vocab, sizeof *s->counts);
        s->touched = malloc((size_t)n_vocab * sizeof *s->touched);
        s->pen = malloc((size_t)n_vocab * sizeof *s->pen);
        s->p = *params, s->n_vocab = n_vocab;
        ek_rng_seed(s->rng, params->seed);
    }
    if (rc == EK_OK && (!s || !s->counts || !s->touched || !s->pen)) ek_sampler_free(s), s = NULL, rc = EK_ERR_NOMEM;
    if (err) *err = rc;
    return s;
}

void ek_sampler_reseed(ek_sampler *s, uint64_t seed) { s->p.seed = seed, ek_rng_seed(s->rng, seed); }
double ek_sampler_random(ek_sampler *s) { return ek_rng_double(s->rng); }

static int ek_reserve_cand(ek_sampler *s, size_t need) {
    if (need <= s->cand_cap) return EK_OK;
    ek_cand *a = realloc(s->cand, need * sizeof *a);
    if (a) s->cand = a;
    ek_cand *b = a ? realloc(s->tmp, need * sizeof *b) : NULL;
    if (b) s->tmp = b, s->cand_cap = need;
    return b ? EK_OK : EK_ERR_NOMEM;
}

/* Step 8 over tokens in ascending id order: the first whose running sum of w exceeds
 * u * total; the last positive weight if rounding leaves none. */
static int32_t draw_list(const ek_cand *c, size_t n, double u) {
    double total = 0, cum = 0;
    for (size_t j = 0; j < n; j++) total += c[j].w;
    double target = u * total;
    for (size_t j = 0; j < n; j++)
        if (target < (cum += c[j].w)) return c[j].id;
    for (size_t j = n; j-- > 0;)
        if (c[j].w > 0) return c[j].id;
    return c[0].id; /* unreachable: the top token has w == 1 */
}

/* Steps 4-8 for a candidate set S in rank order (s->cand[0..len)). has_z: Z and every w
 * are already known (dense path); otherwise they are computed here. */
static int32_t finish_list(ek_sampler *s, size_t len, int has_z, double z) {
    ek_cand *c = s->cand, *t = s->tmp;
    if (!has_z) {
        for (size_t j = 0; j < len; j++) c[j].w = ek_exp_neg(c[j].v - c[0].v);
        if (s->p.top_p < 1.0) { /* Z: sum in ascending id order */
            memcpy(t, c, len * sizeof *t);
            qsort(t, len, sizeof *t, cmp_id);
            for (size_t j = 0; j < len; j++) z += t[j].w;
        }
    }
    size_t keep = len, nk = 0;
    if (s->p.top_p < 1.0) { /* step 5: the shortest rank-order prefix reaching top_p * Z */
        double thr = s->p.top_p * z, cum = 0;
        for (size_t j = 0; j < len; j++)
            if ((cum += c[j].w) >= thr) {
                keep = j + 1;
                break;
            }
    }
    for (size_t j = 0; j < keep; j++) /* step 6 (w >= 0 always holds when min_p is 0) */
        if (c[j].w >= s->p.min_p) t[nk++] = c[j];
    qsort(t, nk, sizeof *t, cmp_id);
    return draw_list(t, nk, ek_rng_double(s->rng));
}

/* Step 1: count the penalty window, penalize each distinct token once. */
static int apply_penalties(ek_sampler *s, const float *l, const int64_t *hist, size_t n_hist, ek_diag *diag) {
    const ek_sampler_params *p = &s->p;
    s->n_touched = 0;
    if (!(p->repetition_penalty != 1.0 || p->frequency_penalty != 0.0 || p->presence_penalty != 0.0)) return EK_OK;
    if (p->penalty_last_n == 0) return EK_OK;
    size_t start = p->penalty_last_n < 0 || n_hist <= (size_t)p->penalty_last_n ? 0 : n_hist - (size_t)p->penalty_last_n;
    for (size_t j = start; j < n_hist; j++) {
        int64_t tok = hist[j];
        if (tok < 0 || tok >= s->n_vocab) {
            for (size_t k = 0; k < s->n_touched; k++) s->counts[s->touched[k]] = 0;
            s->n_touched = 0;
            ek_set_diag(diag, (int64_t)j, 1);
            return EK_ERR_TOKEN;
        }
        if (s->counts[tok]++ == 0) s->touched[s->n_touched++] = (int32_t)tok;
    }
    for (size_t k = 0; k < s->n_touched; k++) {
        double x = (double)l[s->touched[k]];
        if (p->repetition_penalty != 1.0) x = x > 0 ? x / p->repetition_penalty : x * p->repetition_penalty;
        if (p->frequency_penalty != 0.0 || p->presence_penalty != 0.0)
            x = x - (p->frequency_penalty * (double)s->counts[s->touched[k]] + p->presence_penalty);
        s->pen[k] = x;
    }
    return EK_OK;
}

/* Top-k path (greedy is k = 1). Selecting the best k + n_touched tokens by *raw* logit,
 * then swapping in the penalized values of the touched ones, gives the exact top k after
 * penalties: at most n_touched of the raw winners are touched. Untouched tokens keep their
 * raw order under x * scale (monotone; distinct float32 values stay distinct in double for
 * scale in [1e-6, 1e6]), so no pass over penalized values of the whole vocabulary. */
static int sample_top_k(ek_sampler *s, const float *l, size_t k, double scale, int greedy, int32_t *out) {
    size_t m = k + s->n_touched < (size_t)s->n_vocab ? k + s->n_touched : (size_t)s->n_vocab, n = 0;
    if (ek_reserve_cand(s, m + s->n_touched) != EK_OK) return EK_ERR_NOMEM;
    ek_cand *c = s->cand;
    size_t len = select_top_f32(l, (size_t)s->n_vocab, m, c);
    for (size_t j = 0; j < len; j++)
        if (s->counts[c[j].id] == 0) c[n].v = c[j].v * scale, c[n++].id = c[j].id;
    for (size_t j = 0; j < s->n_touched; j++)
        if (s->pen[j] > -INFINITY) c[n].v = s->pen[j] * scale, c[n++].id = s->touched[j];
    if (n == 0) return EK_ERR_MASKED;
    qsort(c, n, sizeof *c, cmp_rank);
    *out = greedy ? c[0].id : finish_list(s, n < k ? n : k, 0, 0.0);
    return EK_OK;
}

/* Dense path (no top-k): v and w over the whole vocabulary. */
static int sample_dense(ek_sampler *s, const float *l, double scale, int32_t *out) {
    size_t n = (size_t)s->n_vocab, n_finite = 0;
    if (!s->v) s->v = malloc(n * sizeof *s->v);
    if (!s->w) s->w = malloc(n * sizeof *s->w);
    if (!s->v || !s->w) return EK_ERR_NOMEM;
    double *v = s->v, *w = s->w, m = -INFINITY, z = 0, min_p = s->p.min_p, total = 0, cum = 0;
    for (size_t i = 0; i < n; i++) v[i] = (double)l[i] * scale; /* step 2 */
    for (size_t k = 0; k < s->n_touched; k++) v[s->touched[k]] = s->pen[k] * scale;
    for (size_t i = 0; i < n; i++) n_finite += v[i] > -INFINITY, m = v[i] > m ? v[i] : m;
    if (n_finite == 0) return EK_ERR_MASKED;
    ek_exp_shift(v, m, w, n); /* step 4; masked tokens get w = 0 */
    if (s->p.top_p < 1.0) {
        for (size_t i = 0; i < n; i++) z += w[i]; /* the zeros of masked tokens change nothing */
        /* Step 5 only needs the rank-order prefix up to top_p * Z: select the best 256,
         * and 8x more while that falls short, instead of sorting the vocabulary. */
        for (size_t want = 256;; want *= 8) {
            want = want < n_finite ? want : n_finite;
            if (ek_reserve_cand(s, want) != EK_OK) return EK_ERR_NOMEM;
            size_t len = select_top_f64(v, n, want, s->cand);
            for (size_t j = 0; j < len; j++) cum += s->cand[j].w = w[s->cand[j].id];
            if (cum >= s->p.top_p * z || len == n_finite) {
                *out = finish_list(s, len, 1, z);
                return EK_OK;
            }
            cum = 0;
        }
    }
    /* No top-p: steps 6-8 straight over the dense weights in id order. */
    for (size_t i = 0; i < n; i++) total += w[i] >= min_p ? w[i] : 0.0;
    double target = ek_rng_double(s->rng) * total;
    for (size_t i = 0; i < n; i++)
        if (target < (cum += w[i] >= min_p ? w[i] : 0.0)) return *out = (int32_t)i, EK_OK;
    for (size_t i = n; i-- > 0;)
        if (w[i] > 0 && w[i] >= min_p) return *out = (int32_t)i, EK_OK;
    return EK_ERR_MASKED; /* unreachable: the top token has w == 1 */
}

/* One decode step: steps 1-8 of sampling_ref.py. hist may be NULL when n_hist == 0.
 * diag: EK_ERR_NAN -> index in logits (arg 0); EK_ERR_TOKEN -> index in hist (arg 1). */
int ek_sampler_sample(ek_sampler *s, const float *logits, size_t n_logits, const int64_t *hist, size_t n_hist,
                      int32_t *out_token, ek_diag *diag) {
    if (n_logits != (size_t)s->n_vocab) return EK_ERR_SIZE;
    int64_t bad = ek_first_bad_logit(logits, n_logits);
    if (bad >= 0) return ek_set_diag(diag, bad, 0), EK_ERR_NAN;
    int rc = apply_penalties(s, logits, hist, n_hist, diag);
    if (rc != EK_OK) return rc;
    if (s->p.temperature == 0.0) rc = sample_top_k(s, logits, 1, 1.0, 1, out_token);
    else if (s->p.top_k > 0) rc = sample_top_k(s, logits, (size_t)s->p.top_k, 1.0 / s->p.temperature, 0, out_token);
    else rc = sample_dense(s, logits, 1.0 / s->p.temperature, out_token);
    for (size_t k = 0; k < s->n_touched; k++) s->counts[s->touched[k]] = 0;
    s->n_touched = 0;
    return rc;
}

/* Speculative acceptance (sampling_ref.py documents the rule). p, q: probabilities that
 * need not be normalized. diag.arg: 0 = p, 1 = q. One draw, two when rejected. */
int ek_sampler_speculative_accept(ek_sampler *s, const float *p, const float *q, size_t n, int64_t draft,
                                  int *accepted, int32_t *token, ek_diag *diag) {
    if (n != (size_t)s->n_vocab) return EK_ERR_SIZE;
    if (draft < 0 || draft >= s->n_vocab) return ek_set_diag(diag, draft, 2), EK_ERR_TOKEN;
    for (int arg = 0; arg < 2; arg++)
        for (size_t i = 0; i < n; i++) {
            float a = arg ? q[i] : p[i];
            if (!isfinite(a) || a < 0) return ek_set_diag(diag, (int64_t)i, arg), isfinite(a) ? EK_ERR_NEGATIVE : EK_ERR_NAN;
        }
    double big_p = 0, big_q = 0, r_total = 0, cum = 0;
    for (size_t i = 0; i < n; i++) big_p += (double)p[i];
    for (size_t i = 0; i < n; i++) big_q += (double)q[i];
    if (!(big_p > 0) || !(big_q > 0)) return ek_set_diag(diag, -1, big_p > 0), EK_ERR_MASKED;
    if (q[draft] == 0.0f) return ek_set_diag(diag, draft, 1), EK_ERR_ZERO_DRAFT;
    double px = (double)p[draft] / big_p, qx = (double)q[draft] / big_q;
    if (ek_rng_double(s->rng) < px / qx) return *accepted = 1, *token = (int32_t)draft, EK_OK;
    *accepted = 0;
#define EK_RESIDUAL(i) ((double)p[i] / big_p - (double)q[i] / big_q > 0 ? (double)p[i] / big_p - (double)q[i] / big_q : 0.0)
    for (size_t i = 0; i < n; i++) r_total += EK_RESIDUAL(i);
    int use_r = r_total > 0; /* else p == q up to rounding: draw from p */
    double target = ek_rng_double(s->rng) * (use_r ? r_total : big_p);
    int64_t last = -1;
    for (size_t i = 0; i < n; i++) {
        double wi = use_r ? EK_RESIDUAL(i) : (double)p[i];
        last = wi > 0 ? (int64_t)i : last;
        if (target < (cum += wi)) return *token = (int32_t)i, EK_OK;
    }
#undef EK_RESIDUAL
    *token = (int32_t)last;
    return EK_OK;
}

/* Confidence of softmax(logits) at temperature 1: out = {max_prob, margin, entropy}. */
int ek_confidence(const float *l, size_t n, double out[3], ek_diag *diag) {
    if (n == 0) return EK_ERR_SIZE;
    float m1, m2;
    int64_t bad = ek_top2(l, n, &m1, &m2);
    if (bad >= 0) return ek_set_diag(diag, bad, 0), EK_ERR_NAN;
    if (m1 == -INFINITY) return EK_ERR_MASKED;
    double sums[2];
    ek_conf_sums(l, n, (double)m1, sums);
    out[0] = 1.0 / sums[0];
    out[1] = (1.0 - exp((double)m2 - (double)m1)) / sums[0];
    out[2] = log(sums[0]) - sums[1] / sums[0];
    return EK_OK;
}

/* ---- latency statistics: two series (0 = TTFT, 1 = per token), each a ring buffer of
 * the last `window` samples (quantiles) plus a running count and sum over all (mean). */

typedef struct { double *buf; size_t cap, len, head; uint64_t count; double sum; } ek_series;
typedef struct ek_latency { size_t window; ek_series s[2]; } ek_latency;

ek_latency *ek_latency_create(size_t window) {
    ek_latency *l = window ? calloc(1, sizeof *l) : NULL;
    if (l) l->window = window;
    return l;
}

void ek_latency_free(ek_latency *l) {
    if (l) free(l->s[0].buf), free(l->s[1].buf);
    free(l);
}

void ek_latency_reset(ek_latency *l) {
    for (int k = 0; k < 2; k++) l->s[k].len = l->s[k].head = 0, l->s[k].count = 0, l->s[k].sum = 0;
}

int ek_latency_record(ek_latency *l, int series, double seconds) {
    if (series < 0 || series > 1 || !(seconds >= 0 && seconds <= DBL_MAX)) return EK_ERR_PARAM;
    ek_series *s = &l->s[series];
    if (s->len < l->window) {
        if (s->len == s->cap) { /* grow geometrically up to the window */
            size_t cap = s->cap ? s->cap * 2 : 1024;
            cap = cap < l->window ? cap : l->window;
            double *b = realloc(s->buf, cap * sizeof *b);
            if (!b) return EK_ERR_NOMEM;
            s->buf = b, s->cap = cap;
        }
        s->buf[s->len++] = seconds;
    } else { /* full: overwrite the oldest */
        s->buf[s->head] = seconds;
        s->head = (s->head + 1) % l->window;
    }
    s->count++;
    s->sum += seconds;
    return EK_OK;
}

static int cmp_double(const void *a, const void *b) {
    return *(const double *)a < *(const double *)b ? -1 : *(const double *)a > *(const double *)b;
}

/* numpy's default 'linear' quantile of an ascending array, with numpy's rounding. */
static double quantile_sorted(const double *s, size_t n, double q) {
    double h = (double)(n - 1) * q, fl = floor(h), t = h - fl;
    size_t i = (size_t)fl, i1 = i + 1 < n ? i + 1 : n - 1;
    double a = s[i], b = s[i1], diff = b - a;
    return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

/* count, mean and the quantiles qs[0..nq) of one series; EK_ERR_EMPTY when it has none. */
int ek_latency_stats(const ek_latency *l, int series, const double *qs, size_t nq, uint64_t *count, double *mean,
                     double *out) {
    if (series < 0 || series > 1) return EK_ERR_PARAM;
    const ek_series *s = &l->s[series];
    *count = s->count;
    if (s->len == 0) return EK_ERR_EMPTY;
    *mean = s->sum / (double)s->count;
    double *sorted = malloc(s->len * sizeof *sorted);
    if (!sorted) return EK_ERR_NOMEM;
    memcpy(sorted, s->buf, s->len * sizeof *sorted);
    qsort(sorted, s->len, sizeof *sorted, cmp_double);
    for (size_t k = 0; k < nq; k++) out[k] = quantile_sorted(sorted, s->len, qs[k]);
    free(sorted);
    return EK_OK;
}

/* ======================================================================= Part 2: Python */

/* Errors leave as ValueError (bad values, sizes, parameters) or TypeError (a buffer or
 * argument of the wrong kind); the messages match sampling_ref.py's in substance. */

static int py_number(PyObject *o, const char *name, double *out) {
    if (!o) return 0; /* keyword not given: keep the default */
    if (PyBool_Check(o) || !PyNumber_Check(o) || PyComplex_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a number, got %s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = PyFloat_AsDouble(o);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* An int in [lo, hi] into *out; overflow is reported as out of range. With seed != NULL,
 * an int in [0, 2**64) into *seed instead. */
static int py_int(PyObject *o, const char *name, long long lo, long long hi, long long *out, uint64_t *seed) {
    if (!o) return 0;
    if (PyBool_Check(o) || !PyIndex_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *idx = PyNumber_Index(o);
    if (!idx) return -1;
    int overflow = 0, bad;
    if (seed) {
        *seed = PyLong_AsUnsignedLongLong(idx);
        bad = *seed == (uint64_t)-1 && PyErr_Occurred();
        if (bad && !PyErr_ExceptionMatches(PyExc_OverflowError)) return Py_DECREF(idx), -1;
        PyErr_Clear();
    } else {
        *out = PyLong_AsLongLongAndOverflow(idx, &overflow);
        bad = overflow || *out < lo || *out > hi;
    }
    Py_DECREF(idx);
    if (!bad) return 0;
    if (seed) PyErr_Format(PyExc_ValueError, "seed must be in [0, 18446744073709551615], got %R", o);
    else PyErr_Format(PyExc_ValueError, "%s must be in [%lld, %lld], got %R", name, lo, hi, o);
    return -1;
}

/* The format character of a native-byte-order single-item format, or 0. */
static char native_format(const char *f) {
    if (!f) return 'B';
    if (*f == '@' || *f == '=' || *f == (PY_LITTLE_ENDIAN ? '<' : '>')) f++;
    return f[0] && !f[1] ? f[0] : 0;
}

/* A C-contiguous float32 view of obj; release with PyBuffer_Release. */
static int get_f32(PyObject *obj, const char *name, Py_buffer *view) {
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be a float32 buffer (numpy float32 array, array.array('f'), memoryview), got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_FULL_RO) < 0) return -1;
    const char *err = NULL;
    if (native_format(view->format) != 'f' || view->itemsize != 4) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be float32 (buffer format 'f'), got format '%s'; convert with .astype(numpy.float32)",
                     name, view->format ? view->format : "B");
        err = "";
    } else if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous buffer; pass numpy.ascontiguousarray(%s)", name, name);
        err = "";
    }
    if (err) PyBuffer_Release(view);
    return err ? -1 : 0;
}

static PyObject *bad_logit(const float *l, int64_t i) {
    return PyErr_Format(PyExc_ValueError, "logits[%lld] is %s", (long long)i,
                        isnan(l[i]) ? "NaN" : "+inf (use -inf to mask a token)");
}

/* ---- confidence(): a struct sequence (a tuple with named fields) */

static PyTypeObject *ConfidenceType;
static PyStructSequence_Field conf_fields[] = {{"max_prob", "largest probability p1"},
                                               {"margin", "p1 - p2, the gap to the second-largest probability"},
                                               {"entropy", "entropy of the distribution, nats"},
                                               {NULL, NULL}};
static PyStructSequence_Desc conf_desc = {"edgekit.runtime._fastpath.Confidence",
                                          "Confidence statistics of softmax(logits) at temperature 1.", conf_fields, 3};

static PyObject *py_confidence(PyObject *mod, PyObject *arg) {
    Py_buffer view;
    if (get_f32(arg, "logits", &view) < 0) return NULL;
    double out[3];
    ek_diag d = {-1, 0};
    PyObject *res = NULL;
    int rc = ek_confidence((const float *)view.buf, (size_t)(view.len / 4), out, &d);
    if (rc == EK_ERR_NAN) bad_logit(view.buf, d.index);
    else if (rc == EK_ERR_SIZE) PyErr_SetString(PyExc_ValueError, "logits is empty");
    else if (rc == EK_ERR_MASKED) PyErr_SetString(PyExc_ValueError, "every token is masked (all logits are -inf)");
    else if ((res = PyStructSequence_New(ConfidenceType)))
        for (int k = 0; k < 3 && res; k++) {
            PyObject *f = PyFloat_FromDouble(out[k]);
            if (f) PyStructSequence_SET_ITEM(res, k, f);
            else Py_CLEAR(res);
        }
    PyBuffer_Release(&view);
    return res;
}

/* ---- Sampler: new/dealloc wrap ek_sampler_create/ek_sampler_free */

typedef struct {
    PyObject_HEAD ek_sampler *s;
    int64_t *hist; /* history converted to int64 */
    size_t hist_cap;
} SamplerObject;

static PyObject *params_dict(const ek_sampler_params *p) {
    return Py_BuildValue("{s:d,s:i,s:d,s:d,s:d,s:d,s:d,s:i,s:K}", "temperature", p->temperature, "top_k", (int)p->top_k,
                         "top_p", p->top_p, "min_p", p->min_p, "repetition_penalty", p->repetition_penalty,
                         "frequency_penalty", p->frequency_penalty, "presence_penalty", p->presence_penalty,
                         "penalty_last_n", (int)p->penalty_last_n, "seed", (unsigned long long)p->seed);
}

static PyObject *py_default_params(PyObject *mod, PyObject *unused) {
    ek_sampler_params p = ek_sampler_default_params();
    return params_dict(&p);
}

static PyObject *Sampler_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vocab_size", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                             "frequency_penalty", "presence_penalty", "penalty_last_n", "seed", NULL};
    PyObject *o[10] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$OOOOOOOOO:Sampler", kwlist, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &o[9]))
        return NULL;
    ek_sampler_params p = ek_sampler_default_params();
    long long vocab = 0, top_k = p.top_k, last_n = p.penalty_last_n;
    if (py_int(o[0], "vocab_size", 1, INT32_MAX, &vocab, NULL) || py_number(o[1], "temperature", &p.temperature) ||
        py_int(o[2], "top_k", 0, INT32_MAX, &top_k, NULL) || py_number(o[3], "top_p", &p.top_p) ||
        py_number(o[4], "min_p", &p.min_p) || py_number(o[5], "repetition_penalty", &p.repetition_penalty) ||
        py_number(o[6], "frequency_penalty", &p.frequency_penalty) ||
        py_number(o[7], "presence_penalty", &p.presence_penalty) ||
        py_int(o[8], "penalty_last_n", -1, INT32_MAX, &last_n, NULL) || py_int(o[9], "seed", 0, 0, NULL, &p.seed))
        return NULL;
    p.top_k = (int32_t)top_k, p.penalty_last_n = (int32_t)last_n;
    char msg[200];
    if (ek_params_check(&p, msg, sizeof msg) != EK_OK) return PyErr_Format(PyExc_ValueError, "%s", msg);
    SamplerObject *self = (SamplerObject *)type->tp_alloc(type, 0);
    if (self && !(self->s = ek_sampler_create((int32_t)vocab, &p, NULL))) {
        Py_DECREF(self);
        return PyErr_NoMemory(); /* the parameters were checked above */
    }
    return (PyObject *)self;
}

static void Sampler_dealloc(SamplerObject *self) {
    ek_sampler_free(self->s);
    free(self->hist);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int hist_reserve(SamplerObject *self, size_t n) {
    int64_t *h = n > self->hist_cap ? realloc(self->hist, n * sizeof *h) : self->hist;
    if (n > self->hist_cap && h) self->hist = h, self->hist_cap = n;
    return n <= self->hist_cap ? 0 : (PyErr_NoMemory(), -1);
}

/* The penalty window of `history` as int64 in self->hist: n entries, the first being
 * history[*offset] (for error messages). C-contiguous int32/int64 buffers are read
 * directly; anything else (lists, other dtypes, strided arrays) as a sequence of ints. */
static int get_history(SamplerObject *self, PyObject *obj, int32_t last_n, size_t *n, size_t *offset) {
    Py_buffer v;
    size_t total;
    *n = *offset = 0;
    if (obj == Py_None) return 0;
    if (PyObject_CheckBuffer(obj) && PyObject_GetBuffer(obj, &v, PyBUF_FULL_RO) == 0) {
        char f = native_format(v.format);
        int i64 = strchr("qln", f) && f && v.itemsize == 8, i32 = f == 'i' && v.itemsize == 4;
        if ((i64 || i32) && PyBuffer_IsContiguous(&v, 'C')) {
            total = (size_t)(v.len / v.itemsize);
            *offset = last_n < 0 || total <= (size_t)last_n ? 0 : total - (size_t)last_n;
            *n = total - *offset;
            if (hist_reserve(self, *n) < 0) return PyBuffer_Release(&v), -1;
            for (size_t j = 0; j < *n; j++)
                self->hist[j] = i64 ? ((const int64_t *)v.buf)[*offset + j] : ((const int32_t *)v.buf)[*offset + j];
            PyBuffer_Release(&v);
            return 0;
        }
        PyBuffer_Release(&v);
    }
    PyErr_Clear();
    PyObject *seq = PySequence_Check(obj) ? PySequence_Fast(obj, "") : NULL;
    if (!seq) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "history must be a sequence of int token ids, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    total = (size_t)PySequence_Fast_GET_SIZE(seq);
    *offset = last_n < 0 || total <= (size_t)last_n ? 0 : total - (size_t)last_n;
    *n = total - *offset;
    if (hist_reserve(self, *n) < 0) return Py_DECREF(seq), -1;
    for (size_t j = 0; j < *n; j++) {
        PyObject *it = PySequence_Fast_ITEMS(seq)[*offset + j];
        int overflow = 0;
        if (PyBool_Check(it) || !PyIndex_Check(it)) {
            PyErr_Format(PyExc_TypeError, "history must hold int token ids, got %s", Py_TYPE(it)->tp_name);
            return Py_DECREF(seq), -1;
        }
        long long t = PyLong_AsLongLongAndOverflow(it, &overflow);
        if (t == -1 && PyErr_Occurred()) return Py_DECREF(seq), -1;
        self->hist[j] = overflow ? -1 : t; /* beyond int64: reported as outside the vocabulary */
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *Sampler_sample(SamplerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "history", NULL};
    PyObject *logits, *history = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:sample", kwlist, &logits, &history)) return NULL;
    ek_sampler *s = self->s;
    const ek_sampler_params *p = &s->p;
    size_t n_hist = 0, offset = 0;
    /* The history is only read when a penalty is active, as in the reference. */
    int penalties = (p->repetition_penalty != 1.0 || p->frequency_penalty != 0.0 || p->presence_penalty != 0.0) &&
                    p->penalty_last_n != 0;
    if (penalties && get_history(self, history, p->penalty_last_n, &n_hist, &offset) < 0) return NULL;
    Py_buffer lv;
    if (get_f32(logits, "logits", &lv) < 0) return NULL;
    int32_t token = -1;
    ek_diag d = {-1, 0};
    size_t n = (size_t)(lv.len / 4);
    int rc = ek_sampler_sample(s, (const float *)lv.buf, n, self->hist, n_hist, &token, &d);
    if (rc == EK_ERR_NAN) bad_logit(lv.buf, d.index);
    else if (rc == EK_ERR_TOKEN)
        PyErr_Format(PyExc_ValueError, "history[%zu] = %lld is outside the vocabulary [0, %d)", offset + (size_t)d.index,
                     (long long)self->hist[d.index], (int)s->n_vocab);
    else if (rc == EK_ERR_SIZE)
        PyErr_Format(PyExc_ValueError, "logits has %zu values but the sampler's vocab_size is %d", n, (int)s->n_vocab);
    else if (rc == EK_ERR_MASKED) PyErr_SetString(PyExc_ValueError, "every token is masked (all logits are -inf)");
    else if (rc == EK_ERR_NOMEM) PyErr_NoMemory();
    PyBuffer_Release(&lv);
    return rc == EK_OK ? PyLong_FromLong(token) : NULL;
}

static PyObject *Sampler_speculative_accept(SamplerObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"p", "q", "draft_token", NULL};
    PyObject *o[3];
    Py_buffer v[2];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:speculative_accept", kwlist, &o[0], &o[1], &o[2])) return NULL;
    if (get_f32(o[0], "p", &v[0]) < 0) return NULL;
    if (get_f32(o[1], "q", &v[1]) < 0) return PyBuffer_Release(&v[0]), NULL;
    const char *names[2] = {"p", "q"};
    size_t vocab = (size_t)self->s->n_vocab, n[2] = {(size_t)(v[0].len / 4), (size_t)(v[1].len / 4)};
    int accepted = 0, rc = EK_ERR_SIZE, w = n[0] != vocab ? 0 : 1;
    int32_t token = -1;
    long long x = 0;
    ek_diag d = {-1, 0};
    if (n[0] != vocab || n[1] != vocab)
        PyErr_Format(PyExc_ValueError, "%s has %zu values but the sampler's vocab_size is %zu", names[w], n[w], vocab);
    else if (py_int(o[2], "draft_token", 0, (long long)vocab - 1, &x, NULL) == 0)
        rc = ek_sampler_speculative_accept(self->s, v[0].buf, v[1].buf, vocab, x, &accepted, &token, &d);
    if (rc == EK_ERR_NAN || rc == EK_ERR_NEGATIVE) {
        PyObject *value = PyFloat_FromDouble(((const float *)v[d.arg].buf)[d.index]);
        if (value)
            PyErr_Format(PyExc_ValueError,
                         rc == EK_ERR_NAN ? "%s[%lld] is %R (probabilities must be finite)" : "%s[%lld] is negative (%R)",
                         names[d.arg], (long long)d.index, value);
        Py_XDECREF(value);
    } else if (rc == EK_ERR_MASKED) {
        PyErr_Format(PyExc_ValueError, "%s sums to 0 (no probability mass)", names[d.arg]);
    } else if (rc == EK_ERR_ZERO_DRAFT) {
        PyErr_Format(PyExc_ValueError, "q[%lld] is 0: the draft model cannot have drafted token %lld", x, x);
    }
    PyBuffer_Release(&v[0]);
    PyBuffer_Release(&v[1]);
    return rc == EK_OK ? Py_BuildValue("(Ni)", PyBool_FromLong(accepted), (int)token) : NULL;
}

static PyObject *Sampler_random(SamplerObject *self, PyObject *unused) {
    return PyFloat_FromDouble(ek_sampler_random(self->s));
}

static PyObject *Sampler_reseed(SamplerObject *self, PyObject *arg) {
    uint64_t seed = 0;
    if (py_int(arg, "seed", 0, 0, NULL, &seed) < 0) return NULL;
    ek_sampler_reseed(self->s, seed);
    Py_RETURN_NONE;
}

static PyObject *Sampler_params(SamplerObject *self, void *c) { return params_dict(&self->s->p); }
static PyObject *Sampler_vocab(SamplerObject *self, void *c) { return PyLong_FromLong(self->s->n_vocab); }

static PyMethodDef Sampler_methods[] = {
    {"sample", (PyCFunction)(void (*)(void))Sampler_sample, METH_VARARGS | METH_KEYWORDS,
     "sample(logits, history=None) -> int\n\nOne decode step: penalties -> temperature -> top-k -> softmax -> top-p "
     "-> min-p -> renormalize -> draw (edgekit.runtime.sampling_ref documents each step)."},
    {"speculative_accept", (PyCFunction)(void (*)(void))Sampler_speculative_accept, METH_VARARGS | METH_KEYWORDS,
     "speculative_accept(p, q, draft_token) -> (accepted, token)\n\nAccept with probability min(1, p[x]/q[x]), else "
     "resample from max(0, p - q); p, q are float32 probabilities."},
    {"random", (PyCFunction)Sampler_random, METH_NOARGS, "random() -> float: the RNG's next double in [0, 1)."},
    {"reseed", (PyCFunction)Sampler_reseed, METH_O, "reseed(seed): restart the RNG stream from seed."},
    {NULL}};

static PyGetSetDef Sampler_getset[] = {{"params", (getter)Sampler_params, NULL, "the sampler's parameters", NULL},
                                       {"vocab_size", (getter)Sampler_vocab, NULL, "vocabulary size", NULL},
                                       {NULL}};

static PyTypeObject SamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgekit.runtime._fastpath.Sampler",
    .tp_basicsize = sizeof(SamplerObject),
    .tp_dealloc = (destructor)Sampler_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sampler(vocab_size, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,\n"
              "        frequency_penalty=0.0, presence_penalty=0.0, penalty_last_n=64, seed=0)",
    .tp_methods = Sampler_methods,
    .tp_getset = Sampler_getset,
    .tp_new = Sampler_new,
};

/* ---- LatencyStats: wraps ek_latency_create/ek_latency_free */

typedef struct { PyObject_HEAD ek_latency *l; } LatencyObject;

static PyObject *Latency_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"window", NULL};
    PyObject *wo = NULL;
    long long window = 1 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:LatencyStats", kwlist, &wo) ||
        py_int(wo, "window", 1, 1LL << 40, &window, NULL) < 0)
        return NULL;
    LatencyObject *self = (LatencyObject *)type->tp_alloc(type, 0);
    if (self && !(self->l = ek_latency_create((size_t)window))) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void Latency_dealloc(LatencyObject *self) {
    ek_latency_free(self->l);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *latency_record(LatencyObject *self, PyObject *arg, int series) {
    const char *name = series ? "token latency" : "ttft latency";
    double x = 0;
    if (py_number(arg, name, &x) < 0) return NULL;
    int rc = ek_latency_record(self->l, series, x);
    if (rc == EK_ERR_NOMEM) return PyErr_NoMemory();
    if (rc != EK_OK) return PyErr_Format(PyExc_ValueError, "%s must be in [0, inf), got %R", name, arg);
    Py_RETURN_NONE;
}
static PyObject *Latency_ttft(LatencyObject *self, PyObject *arg) { return latency_record(self, arg, 0); }
static PyObject *Latency_token(LatencyObject *self, PyObject *arg) { return latency_record(self, arg, 1); }

static PyObject *Latency_reset(LatencyObject *self, PyObject *unused) {
    ek_latency_reset(self->l);
    Py_RETURN_NONE;
}

static PyObject *Latency_quantile(LatencyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"q", "series", NULL};
    const char *name = "token";
    PyObject *qo;
    double q = 0, mean = 0, out = 0;
    uint64_t count = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s:quantile", kwlist, &qo, &name)) return NULL;
    int series = strcmp(name, "ttft") == 0 ? 0 : strcmp(name, "token") == 0 ? 1 : -1;
    if (series < 0) return PyErr_Format(PyExc_ValueError, "series must be 'ttft' or 'token', got '%s'", name);
    if (py_number(qo, "q", &q) < 0) return NULL;
    if (!(q >= 0.0 && q <= 1.0)) return PyErr_Format(PyExc_ValueError, "q must be in [0, 1], got %R", qo);
    int rc = ek_latency_stats(self->l, series, &q, 1, &count, &mean, &out);
    if (rc == EK_ERR_NOMEM) return PyErr_NoMemory();
    if (rc == EK_ERR_EMPTY) Py_RETURN_NONE;
    return PyFloat_FromDouble(out);
}

static PyObject *Latency_summary(LatencyObject *self, PyObject *unused) {
    const double qs[3] = {0.5, 0.9, 0.99};
    PyObject *res = PyDict_New(), *d = NULL;
    for (int k = 0; res && k < 2; k++) {
        double out[3] = {0, 0, 0}, mean = 0;
        uint64_t count = 0;
        int rc = ek_latency_stats(self->l, k, qs, 3, &count, &mean, out);
        if (rc == EK_ERR_NOMEM) d = PyErr_NoMemory();
        else if (rc == EK_ERR_EMPTY)
            d = Py_BuildValue("{s:K,s:i,s:O,s:O,s:O,s:O}", "count", (unsigned long long)count, "window", 0, "mean",
                              Py_None, "p50", Py_None, "p90", Py_None, "p99", Py_None);
        else
            d = Py_BuildValue("{s:K,s:n,s:d,s:d,s:d,s:d}", "count", (unsigned long long)count, "window",
                              (Py_ssize_t)self->l->s[k].len, "mean", mean, "p50", out[0], "p90", out[1], "p99", out[2]);
        if (!d || PyDict_SetItemString(res, k ? "token" : "ttft", d) < 0) Py_CLEAR(res);
        Py_XDECREF(d);
    }
    return res;
}

static PyObject *Latency_window(LatencyObject *self, void *c) { return PyLong_FromSize_t(self->l->window); }

static PyMethodDef Latency_methods[] = {
    {"record_ttft", (PyCFunction)Latency_ttft, METH_O, "record_ttft(seconds): one time-to-first-token."},
    {"record_token", (PyCFunction)Latency_token, METH_O, "record_token(seconds): one per-token latency."},
    {"reset", (PyCFunction)Latency_reset, METH_NOARGS, "reset(): forget every sample."},
    {"quantile", (PyCFunction)(void (*)(void))Latency_quantile, METH_VARARGS | METH_KEYWORDS,
     "quantile(q, series='token') -> float | None (numpy's 'linear' method over the window)."},
    {"summary", (PyCFunction)Latency_summary, METH_NOARGS,
     "summary() -> {'ttft': {...}, 'token': {...}} with count, window, mean, p50, p90, p99."},
    {NULL}};

static PyGetSetDef Latency_getset[] = {{"window", (getter)Latency_window, NULL, "samples kept per series", NULL},
                                       {NULL}};

static PyTypeObject LatencyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgekit.runtime._fastpath.LatencyStats",
    .tp_basicsize = sizeof(LatencyObject),
    .tp_dealloc = (destructor)Latency_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "LatencyStats(window=1 << 20): streaming TTFT / per-token latency statistics (seconds).",
    .tp_methods = Latency_methods,
    .tp_getset = Latency_getset,
    .tp_new = Latency_new,
};

/* ---- module */

static PyMethodDef module_methods[] = {
    {"confidence", (PyCFunction)py_confidence, METH_O,
     "confidence(logits) -> Confidence(max_prob, margin, entropy) of softmax(logits) at temperature 1."},
    {"default_params", (PyCFunction)py_default_params, METH_NOARGS, "default_params() -> dict of sampler defaults."},
    {NULL}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "edgekit.runtime._fastpath",
                                        "C fast path of edgekit.runtime.fastpath (sampling_ref.py is the spec).", -1,
                                        module_methods};

PyMODINIT_FUNC PyInit__fastpath(void) {
    static const struct { const char *name; int value; } codes[] = {
        {"EK_OK", EK_OK}, {"EK_ERR_NAN", EK_ERR_NAN}, {"EK_ERR_SIZE", EK_ERR_SIZE}, {"EK_ERR_PARAM", EK_ERR_PARAM},
        {"EK_ERR_NOMEM", EK_ERR_NOMEM}, {"EK_ERR_MASKED", EK_ERR_MASKED}, {"EK_ERR_TOKEN", EK_ERR_TOKEN},
        {"EK_ERR_NEGATIVE", EK_ERR_NEGATIVE}, {"EK_ERR_ZERO_DRAFT", EK_ERR_ZERO_DRAFT}, {"EK_ERR_EMPTY", EK_ERR_EMPTY}};
    ek_pick_kernels();
    if (PyType_Ready(&SamplerType) < 0 || PyType_Ready(&LatencyType) < 0) return NULL;
    if (!ConfidenceType && !(ConfidenceType = PyStructSequence_NewType(&conf_desc))) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    Py_INCREF(&SamplerType), Py_INCREF(&LatencyType), Py_INCREF(ConfidenceType);
    int err = PyModule_AddObject(m, "Sampler", (PyObject *)&SamplerType) < 0 ||
              PyModule_AddObject(m, "LatencyStats", (PyObject *)&LatencyType) < 0 ||
              PyModule_AddObject(m, "Confidence", (PyObject *)ConfidenceType) < 0 ||
              PyModule_AddStringConstant(m, "KERNEL", ek_kernel) < 0;
    for (size_t i = 0; !err && i < sizeof codes / sizeof codes[0]; i++)
        err = PyModule_AddIntConstant(m, codes[i].name, codes[i].value) < 0;
    if (err) Py_CLEAR(m);
    return m;
}
