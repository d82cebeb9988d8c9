/* zero_sf's fused CPU backend: one pass over memory per optimizer step.
 *
 * The math mirrors zero_sf/spec.py line by line, op by op, as torch's CPU
 * kernels evaluate those ops, measured op by op on torch 2.13's CPU kernels:
 * addcmul = fma(value * t1, t2, self), add/sub with alpha = fma(other, alpha,
 * self), lerp = fma(w or w-1, end - self, self or end), addcdiv = self +
 * (value * t1) / t2, the rest plain fp32 ops.  Compiled with
 * -ffp-contract=off: no other contraction.  One deliberate difference:
 * sqrtf is correctly rounded, while torch's AVX512 sqrt is off by one ulp
 * in about 18 % of elements (so the spec's bits depend on the CPU).
 *
 * Work: an array of tasks (one per tensor), processed in blocks of BLOCK
 * elements: low-precision inputs are widened into fp32 scratch arrays on
 * the stack, the block is updated in fp32 (loops the compiler vectorizes),
 * low-precision outputs are rounded to nearest even.  Threads (torch's own
 * OpenMP runtime) claim chunks of blocks from a shared counter.
 *
 * Built at first use by zero_sf/cpu/__init__.py with the system C compiler
 * and cached; loaded with ctypes.  No Python or torch headers.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024
#define MAX_THREADS 256

enum { F32 = 0, BF16 = 1, F16 = 2, NONE = 3 };

typedef struct {
    void *p[6];
    int64_t n;
    void *rem;    /* int16 remainders of a bf16 p[0] (exact fp32 y), or NULL */
    int64_t base; /* global index of element 0 (stochastic rounding's counter) */
} zsf_task;

/* ------------------------------------------------------------ conversion */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* ------------------------------------------- compressed state (spec.py) */
static inline uint32_t mix32(uint32_t x) { /* Wellons' lowbias32 */
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

/* The random words of a block (spec.random_bits): mix32(mix32(lo32(idx) ^
 * key) ^ hi32(idx)).  The index's high half is the same for the whole block
 * unless the block crosses a multiple of 2**32 (then element by element);
 * otherwise the loop runs on 32-bit lanes only. */
static void hash_block(uint32_t *rb, int m, int64_t idx0, uint32_t key) {
    const uint64_t first = (uint64_t)idx0, last = first + (uint64_t)(m - 1);
    if ((first >> 32) != (last >> 32)) {
        for (int i = 0; i < m; i++) {
            uint64_t idx = first + (uint64_t)i;
            rb[i] = mix32(mix32((uint32_t)idx ^ key) ^ (uint32_t)(idx >> 32));
        }
        return;
    }
    const uint32_t hi = (uint32_t)(first >> 32), lo0 = (uint32_t)first;
    for (int i = 0; i < m; i++) rb[i] = mix32(mix32((lo0 + (uint32_t)i) ^ key) ^ hi);
}

/* bf16 with stochastic rounding (spec.round_stochastic): the lane's 16
 * random bits (bits `shift` and up of the block's words) are added to the
 * 16 dropped bits, then truncated; NaN stays NaN. */
static void store_sr(uint16_t *d, const float *src, const uint32_t *rb, int shift, int m) {
    for (int i = 0; i < m; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], 4);
        uint16_t sr = (uint16_t)((bits + ((rb[i] >> shift) & 0xffffu)) >> 16);
        uint16_t nan = (uint16_t)((bits >> 16) | 0x40); /* quiet NaN, as f32_to_bf16 */
        d[i] = (bits & 0x7fffffffu) > 0x7f800000u ? nan : sr;
    }
}

/* y = bf16 parameter + int16 remainder, exactly (spec.join_master/split_master) */
static void load_joined(float *dst, const uint16_t *p, const int16_t *rem, int m) {
    for (int i = 0; i < m; i++) {
        uint32_t lo = (uint16_t)rem[i];
        uint32_t hi = (uint16_t)(p[i] - (lo >= 0x8000u ? 1u : 0u));
        uint32_t bits = (hi << 16) | lo;
        memcpy(&dst[i], &bits, 4);
    }
}

static void store_split(uint16_t *p, int16_t *rem, const float *src, int m) {
    for (int i = 0; i < m; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], 4);
        uint32_t lo = bits & 0xffffu;
        p[i] = (uint16_t)((bits >> 16) + (lo >= 0x8000u ? 1u : 0u));
        rem[i] = (int16_t)(uint16_t)lo;
    }
}

static void load(float *dst, const void *src, int dt, int64_t off, int m) {
    if (dt == F32) {
        memcpy(dst, (const float *)src + off, (size_t)m * 4);
    } else if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int i = 0; i < m; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        const _Float16 *s = (const _Float16 *)src + off;
        for (int i = 0; i < m; i++) dst[i] = (float)s[i];
    }
}

static void store(void *dst, const float *src, int dt, int64_t off, int m) {
    if (dt == F32) {
        memcpy((float *)dst + off, src, (size_t)m * 4);
    } else if (dt == BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int i = 0; i < m; i++) d[i] = f32_to_bf16(src[i]);
    } else if (dt == F16) {
        _Float16 *d = (_Float16 *)dst + off;
        for (int i = 0; i < m; i++) d[i] = (_Float16)src[i];
    }
}

/* torch's lerp(self, end, w): |w| < 0.5 ? self + w*(end-self) : end - (end-self)*(1-w),
 * as its Vectorized code computes it: fma(w or w-1, end - self, self or end). */

/* --------------------------------------------------------------- the rules */
typedef struct {
    int kind; /* 0 sf_adamw, 1 rmsprop, 2 interpolate */
    int dt_p, dt_g, dt_out;
    /* sf_adamw */
    float lr, ck, y_coef, beta2, one_minus_beta2, bc2, eps, wd, scale;
    int has_bc2, has_wd;
    /* rmsprop */
    float alpha, one_minus_alpha, momentum;
    int centered, eps_in_sqrt, maximize, has_momentum;
    /* interpolate */
    float weight;
    /* compressed state: dtype of the state tensors (F32 or BF16), stochastic
     * rounding on/off and the keys of random streams 0 and 1 (a state tensor's
     * lane l takes 16 bits of stream l / 2: spec.lane_bits) */
    int dt_s, sr;
    uint32_t key[2];
} zsf_args;

/* The loops below read every scalar into a local first (so the compiler
 * knows no store aliases them) and branch outside the loop (one vectorized
 * loop per variant).  x * 1.0f and -(-x) are exact, so "no grad scale"
 * and "no maximize" need no variant; "no bias correction" (x / 1.0f, also
 * exact) gets one because it saves a division per element. */
static void sf_block(const zsf_args *a, float *restrict y, const float *restrict g,
                     float *restrict z, float *restrict v, int m) {
    const float scale = a->scale, beta2 = a->beta2, c = a->one_minus_beta2, bc2 = a->bc2,
                eps = a->eps, wd = a->wd, ck = a->ck, y_coef = a->y_coef, neg_lr = -a->lr;
    const float cw = fabsf(ck) < 0.5f ? ck : ck - 1.0f; /* lerp's coefficient and base */
    const int from_y = fabsf(ck) < 0.5f;
#define SF_BODY(WD, BC)                                                               \
    for (int i = 0; i < m; i++) {                                                     \
        float gi = g[i] * scale;                                                      \
        float vi = fmaf(c * gi, gi, v[i] * beta2); /* v.mul_(b2).addcmul_(g,g,1-b2) */ \
        v[i] = vi;                                                                    \
        float u = gi / (sqrtf(BC ? vi / bc2 : vi) + eps); /* x / 1 == x: skipped */   \
        float yi = y[i], zi = z[i];                                                   \
        if (WD) u = fmaf(yi, wd, u);          /* u.add_(y, alpha=wd) */               \
        yi = fmaf(cw, zi - yi, from_y ? yi : zi); /* y.lerp_(z, ck) */                \
        y[i] = fmaf(u, y_coef, yi);           /* y.add_(u, alpha=y_coef) */           \
        z[i] = fmaf(u, neg_lr, zi);           /* z.sub_(u, alpha=lr) */               \
    }
    /* bias_correction2 == 1.0 exactly after ~37K steps of beta2 = 0.999 */
    if (a->has_wd) {
        if (a->has_bc2) { SF_BODY(1, 1) } else { SF_BODY(1, 0) }
    } else {
        if (a->has_bc2) { SF_BODY(0, 1) } else { SF_BODY(0, 0) }
    }
#undef SF_BODY
}

static void rms_block(const zsf_args *a, float *restrict p, const float *restrict g,
                      float *restrict v, float *restrict buf, float *restrict gavg, int m) {
    const float scale = a->maximize ? -a->scale : a->scale, wd = a->wd, alpha = a->alpha,
                c = a->one_minus_alpha, bc2 = a->bc2, eps = a->eps, mom = a->momentum,
                neg_lr = -a->lr;
    const float cw = fabsf(c) < 0.5f ? c : c - 1.0f;
    const int from_avg = fabsf(c) < 0.5f;
    const int wd_on = a->has_wd, centered = a->centered, in_sqrt = a->eps_in_sqrt,
              momentum = a->has_momentum, has_bc2 = a->has_bc2;
    for (int i = 0; i < m; i++) {
        /* g * scale, then -g for maximize: (g * -scale) is the same bits */
        float gi = g[i] * scale;
        float pi = p[i];
        if (wd_on) gi = fmaf(pi, wd, gi);                   /* g.add(p, alpha=wd) */
        float vi = fmaf(c * gi, gi, v[i] * alpha);           /* v.mul_(a).addcmul_(g,g,1-a) */
        v[i] = vi;
        float avg = vi;
        if (centered) {
            float ga = gavg[i];
            ga = fmaf(cw, gi - ga, from_avg ? ga : gi);      /* gavg.lerp_(g, 1-alpha) */
            gavg[i] = ga;
            avg = fmaf(-1.0f * ga, ga, vi);                 /* v.addcmul(gavg, gavg, -1) */
        }
        if (has_bc2) avg = avg / bc2;
        avg = in_sqrt ? sqrtf(avg + eps) : sqrtf(avg) + eps;
        if (momentum) {
            float b = buf[i] * mom;                         /* buf.mul_(momentum) */
            b = b + gi / avg;                               /* .addcdiv_(g, avg) */
            buf[i] = b;
            pi = fmaf(b, neg_lr, pi);                       /* p.add_(buf, alpha=-lr) */
        } else {
            pi = pi + (neg_lr * gi) / avg;                  /* p.addcdiv_(g, avg, -lr) */
        }
        p[i] = pi;
    }
}

/* fp32 operands are used in place; others are widened into scratch. */
static float *in_place_or_load(float *scratch, void *src, int dt, int64_t off, int m) {
    if (dt == F32) return (float *)src + off;
    load(scratch, src, dt, off, m);
    return scratch;
}

/* y (or p): joined with its remainder when it has one */
static float *load_y(float *scratch, const zsf_task *k, int dt, int64_t off, int m) {
    if (k->rem) {
        load_joined(scratch, (const uint16_t *)k->p[0] + off, (const int16_t *)k->rem + off, m);
        return scratch;
    }
    return in_place_or_load(scratch, k->p[0], dt, off, m);
}

static void store_y(const zsf_task *k, const float *y, int dt, int64_t off, int m) {
    if (k->rem) store_split((uint16_t *)k->p[0] + off, (int16_t *)k->rem + off, y, m);
    else if (dt != F32) store(k->p[0], y, dt, off, m);
}

/* a state tensor back to memory: in place (fp32), rounded stochastically
 * with lane `lane` of the block's random words, or to nearest even (bf16) */
static void store_state(const zsf_args *a, void *dst, const float *src, const uint32_t *rb,
                        int lane, int64_t off, int m) {
    if (a->dt_s == F32) return;
    if (a->sr) store_sr((uint16_t *)dst + off, src, rb, 16 * (lane & 1), m);
    else store(dst, src, BF16, off, m);
}

static void run_range(const zsf_args *a, const zsf_task *tasks, int ntasks, int64_t lo, int64_t hi) {
    float sp[BLOCK], sg[BLOCK], so[BLOCK], s1[BLOCK], s2[BLOCK], s3[BLOCK];
    uint32_t rb0[BLOCK], rb1[BLOCK]; /* random words of streams 0 and 1 */
    int64_t base = 0;
    for (int t = 0; t < ntasks && base < hi; t++) {
        const zsf_task *k = &tasks[t];
        int64_t s = lo > base ? lo - base : 0, e = hi - base < k->n ? hi - base : k->n;
        for (int64_t off = s; off < e; off += BLOCK) {
            int m = (int)(e - off < BLOCK ? e - off : BLOCK);
            if (a->kind == 0) { /* y, g, z, v, out */
                float *y = load_y(sp, k, a->dt_p, off, m);
                float *g = in_place_or_load(sg, k->p[1], a->dt_g, off, m);
                float *z = in_place_or_load(s1, k->p[2], a->dt_s, off, m);
                float *v = in_place_or_load(s2, k->p[3], a->dt_s, off, m);
                sf_block(a, y, g, z, v, m);
                if (a->sr) hash_block(rb0, m, k->base + off, a->key[0]); /* one word: z and v */
                store_state(a, k->p[2], z, rb0, 0, off, m); /* LANE_Z */
                store_state(a, k->p[3], v, rb0, 1, off, m); /* LANE_V */
                store_y(k, y, a->dt_p, off, m);
                if (k->p[4]) {
                    if (k->rem) memcpy((uint16_t *)k->p[4] + off, (uint16_t *)k->p[0] + off, (size_t)m * 2);
                    else store(k->p[4], y, a->dt_out, off, m);
                }
            } else if (a->kind == 1) { /* p, g, v, buf, gavg, out */
                float *p = load_y(sp, k, a->dt_p, off, m);
                float *g = in_place_or_load(sg, k->p[1], a->dt_g, off, m);
                float *v = in_place_or_load(s1, k->p[2], a->dt_s, off, m);
                float *b = k->p[3] ? in_place_or_load(s2, k->p[3], a->dt_s, off, m) : NULL;
                float *ga = k->p[4] ? in_place_or_load(s3, k->p[4], a->dt_s, off, m) : NULL;
                rms_block(a, p, g, v, b, ga, m);
                if (a->sr) hash_block(rb0, m, k->base + off, a->key[0]);
                if (a->sr && ga) hash_block(rb1, m, k->base + off, a->key[1]);
                store_state(a, k->p[2], v, rb0, 0, off, m);          /* LANE_SQUARE_AVG */
                if (b) store_state(a, k->p[3], b, rb0, 1, off, m);   /* LANE_BUF */
                if (ga) store_state(a, k->p[4], ga, rb1, 2, off, m); /* LANE_GAVG */
                store_y(k, p, a->dt_p, off, m);
                if (k->p[5]) {
                    if (k->rem) memcpy((uint16_t *)k->p[5] + off, (uint16_t *)k->p[0] + off, (size_t)m * 2);
                    else store(k->p[5], p, a->dt_out, off, m);
                }
            } else { /* p, z, out: p.lerp_(z, weight) */
                float *p = load_y(sp, k, a->dt_p, off, m);
                const float *z = in_place_or_load(s1, k->p[1], a->dt_s, off, m);
                const float w = a->weight, cw = fabsf(w) < 0.5f ? w : w - 1.0f;
                const int from_p = fabsf(w) < 0.5f;
                for (int i = 0; i < m; i++) so[i] = fmaf(cw, z[i] - p[i], from_p ? p[i] : z[i]);
                if (k->rem) store_split((uint16_t *)k->p[0] + off, (int16_t *)k->rem + off, so, m);
                else if (a->dt_p == F32) memcpy(p, so, (size_t)m * 4);
                else store(k->p[0], so, a->dt_p, off, m);
                if (k->p[2]) {
                    if (k->rem) memcpy((uint16_t *)k->p[2] + off, (uint16_t *)k->p[0] + off, (size_t)m * 2);
                    else store(k->p[2], so, a->dt_out, off, m);
                }
            }
        }
        base += k->n;
    }
}

/* Threads: the OpenMP runtime torch itself uses (torch ships libgomp.so.1
 * and loads it first; this library links the same soname, so the loader
 * hands it torch's runtime and its thread pool).  Measured why: a private
 * pthread pool lost the second core to torch's OpenMP threads, which spin
 * for a while after every torch op (7.6 ms for a 16M-element step, the
 * one-thread time, against DeepSpeedCPUAdam's 4.4 ms).  Inside the one
 * parallel region, threads claim chunks from a shared counter, so a thread
 * that starts late finds less work instead of a fixed half. */
#define CLAIM 16 /* the smallest claim; large jobs claim 1/8 of a thread's share */

typedef struct {
    const zsf_args *a;
    const zsf_task *tasks;
    int ntasks;
    int64_t total, nblocks, claim;
    atomic_llong next;
} zsf_job;

static void job_work(zsf_job *j) {
    for (;;) {
        int64_t b = atomic_fetch_add(&j->next, j->claim);
        if (b >= j->nblocks) break;
        int64_t e = b + j->claim < j->nblocks ? b + j->claim : j->nblocks;
        int64_t hi = e * BLOCK < j->total ? e * BLOCK : j->total;
        run_range(j->a, j->tasks, j->ntasks, b * BLOCK, hi);
    }
}

/* Entry point: every task's elements, on up to nthreads threads (the
 * caller is one of them).  Returns 0. */
int zsf_run(const zsf_args *a, const zsf_task *tasks, int ntasks, int nthreads) {
    int64_t total = 0;
    for (int t = 0; t < ntasks; t++) total += tasks[t].n;
    int64_t nblocks = (total + BLOCK - 1) / BLOCK;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > (nblocks + CLAIM - 1) / CLAIM) nthreads = (int)((nblocks + CLAIM - 1) / CLAIM);
    if (nthreads <= 1) {
        run_range(a, tasks, ntasks, 0, total);
        return 0;
    }
    zsf_job j;
    j.a = a;
    j.tasks = tasks;
    j.ntasks = ntasks;
    j.total = total;
    j.nblocks = nblocks;
    /* long contiguous runs per claim keep the hardware prefetchers streaming
     * (16K-element claims: 40 % slower at 16M elements, measured) */
    j.claim = nblocks / (8 * (int64_t)nthreads) > CLAIM ? nblocks / (8 * (int64_t)nthreads) : CLAIM;
    atomic_init(&j.next, 0);
#pragma omp parallel num_threads(nthreads)
    job_work(&j);
    return 0;
}
