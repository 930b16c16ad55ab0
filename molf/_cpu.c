/* The CPU loops molf/_cpu.py builds and loads: the eager optimizer's step in one call per pass over every
   tensor, and the dropout keep-mask.

   moments_score:  m <- m + (1 - b1)(g - m),  v <- b2 v + (1 - b2) g^2,  step <- step + 1  (in place), and
                   per expert e: sum over its tensors of m^2/(sqrt(v) + 1e-8) (EPD) or (m/(sqrt(v) + 1e-8))^2
                   (PFN), read from the stored (rounded) moments, fp32 terms summed per block, blocks in double.
   adamw_update:   p <- p (1 - lr wd) - lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps) for tensors outside
                   MoLF layers and those whose expert won (win[owner]); the rest are not touched.

   A tensor is a row of plain tables (pointers, numel, dtype codes, owner, param group): host work per call is
   O(tensors). Elements are cut into blocks of BLOCK, shared by OpenMP threads; block sums are added in block
   order after the parallel loop, so a sum does not depend on the thread count. Each block goes through L1
   staging buffers of CHUNK fp32 values, so one dtype-independent loop serves fp32, bf16 and fp16 storage
   (fp32 arrays are used in place). Rounding is to nearest even, NaN kept, as torch's casts. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define BLOCK 8192
#define CHUNK 256
#define LANES 16
#define EPS_SCORE 1e-8f

#ifdef __FLT16_MAX__
int molf_has_f16(void) { return 1; }
#else
int molf_has_f16(void) { return 0; }
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* NaN stays (quiet) NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* n values at x (dtype dt) as fp32: x itself when fp32, else converted into buf. */
static const float *load(const void *x, int dt, int64_t i0, int n, float *buf) {
    if (dt == F32) return (const float *)x + i0;
    if (dt == BF16) {
        const uint16_t *h = (const uint16_t *)x + i0;
        for (int i = 0; i < n; i++) buf[i] = bf16_to_f32(h[i]);
    }
#ifdef __FLT16_MAX__
    else {
        const _Float16 *h = (const _Float16 *)x + i0;
        for (int i = 0; i < n; i++) buf[i] = (float)h[i];
    }
#endif
    return buf;
}

/* Where n new fp32 values go before the store: x itself when fp32, else buf. */
static float *target(void *x, int dt, int64_t i0, float *buf) {
    return dt == F32 ? (float *)x + i0 : buf;
}

/* Stores buf (unless it is x itself) and leaves in buf the stored value read back (the rounded one). */
static void store(void *x, int dt, int64_t i0, int n, float *buf) {
    if (dt == BF16) {
        uint16_t *h = (uint16_t *)x + i0;
        for (int i = 0; i < n; i++) {
            h[i] = f32_to_bf16(buf[i]);
            buf[i] = bf16_to_f32(h[i]);
        }
    }
#ifdef __FLT16_MAX__
    else if (dt == F16) {
        _Float16 *h = (_Float16 *)x + i0;
        for (int i = 0; i < n; i++) {
            h[i] = (_Float16)buf[i];
            buf[i] = (float)h[i];
        }
    }
#endif
}

/* Blocks of the tensors with use[i] != 0: first[i] = index of tensor i's first block; returns the total. */
static int64_t block_table(int64_t n, const int64_t *numel, const uint8_t *use, int64_t *first) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        first[i] = total;
        if (use[i]) total += (numel[i] + BLOCK - 1) / BLOCK;
    }
    return total;
}

/* The tensor holding block b: the last i with first[i] <= b (binary search). A tensor without blocks (not
   in use, or empty) shares its successor's first block, so the last such i is the one that holds b. */
static int64_t tensor_of_block(int64_t n, const int64_t *first, int64_t b) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static double block_moments(void *g, void *m, void *v, int dg, int dm, int dv, int64_t i0, int64_t i1,
                            float omb1, float b2, float omb2, int score) {
    float gb[CHUNK], mb[CHUNK], vb[CHUNK];
    double total = 0.0;
    for (int64_t c = i0; c < i1; c += CHUNK) {
        int n = (int)(i1 - c < CHUNK ? i1 - c : CHUNK);
        const float *gf = load(g, dg, c, n, gb);
        const float *mo = load(m, dm, c, n, mb);
        const float *vo = load(v, dv, c, n, vb);
        float *mn = target(m, dm, c, mb), *vn = target(v, dv, c, vb);
        for (int i = 0; i < n; i++) {
            float gi = gf[i], mi = mo[i];
            mn[i] = mi + omb1 * (gi - mi);
            vn[i] = b2 * vo[i] + omb2 * gi * gi;
        }
        store(m, dm, c, n, mb);
        store(v, dv, c, n, vb);
        if (score < 0) continue;
        float t[CHUNK], acc[LANES] = {0};
        if (score == 0)
            for (int i = 0; i < n; i++) t[i] = mn[i] * mn[i] / (sqrtf(vn[i]) + EPS_SCORE);
        else
            for (int i = 0; i < n; i++) {
                float q = mn[i] / (sqrtf(vn[i]) + EPS_SCORE);
                t[i] = q * q;
            }
        for (int i = n; i % LANES; i++) t[i] = 0.0f;
        for (int i = 0; i < n; i += LANES)  /* LANES partial sums: a loop the compiler vectorizes as is */
            for (int j = 0; j < LANES; j++) acc[j] += t[i + j];
        float s = 0.0f;
        for (int j = 0; j < LANES; j++) s += acc[j];
        total += s;
    }
    return total;
}

/* Columns of n rows: pointers g, m, v, step (fp32 scalar), numel, dtype codes dg, dm, dv, owner (expert index;
   < 0: no score, a parameter outside MoLF layers). score: 0 EPD, 1 PFN. sums: one double per expert, added to
   (the caller zeroes them). Returns 0, or -1 when out of memory. */
int molf_moments_score(int64_t n, const int64_t *g, const int64_t *m, const int64_t *v, const int64_t *step,
                       const int64_t *numel, const uint8_t *dg, const uint8_t *dm, const uint8_t *dv,
                       const int64_t *owner, double b1, double b2, int score, double *sums, int threads) {
    int64_t *first = malloc((size_t)(n + 1) * sizeof(int64_t));
    uint8_t *use = malloc((size_t)(n + 1));
    if (!first || !use) { free(first); free(use); return -1; }
    for (int64_t i = 0; i < n; i++) use[i] = 1;
    int64_t total = block_table(n, numel, use, first);
    double *part = malloc((size_t)(total + 1) * sizeof(double));
    if (!part) { free(first); free(use); return -1; }
    float omb1 = (float)(1.0 - b1), b2f = (float)b2, omb2 = (float)(1.0 - b2);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < total; b++) {
        int64_t i = tensor_of_block(n, first, b);
        int64_t i0 = (b - first[i]) * BLOCK, i1 = i0 + BLOCK < numel[i] ? i0 + BLOCK : numel[i];
        part[b] = block_moments((void *)g[i], (void *)m[i], (void *)v[i], dg[i], dm[i], dv[i], i0, i1, omb1, b2f, omb2,
                                owner[i] < 0 ? -1 : score);
    }
    for (int64_t i = 0; i < n; i++) {
        *(float *)step[i] += 1.0f;
        if (owner[i] < 0) continue;
        int64_t end = i + 1 < n ? first[i + 1] : total;
        double s = 0.0;
        for (int64_t b = first[i]; b < end; b++) s += part[b];
        sums[owner[i]] += s;
    }
    free(part); free(first); free(use);
    return 0;
}

static void block_update(void *p, void *m, void *v, int dp, int dm, int dv, int64_t i0, int64_t i1, float step_size,
                         float inv_bc2_sqrt, float decay, float eps) {
    float pb[CHUNK], mb[CHUNK], vb[CHUNK];
    for (int64_t c = i0; c < i1; c += CHUNK) {
        int n = (int)(i1 - c < CHUNK ? i1 - c : CHUNK);
        const float *po = load(p, dp, c, n, pb);
        const float *mo = load(m, dm, c, n, mb);
        const float *vo = load(v, dv, c, n, vb);
        float *pn = target(p, dp, c, pb);
        for (int i = 0; i < n; i++)
            pn[i] = po[i] * decay - step_size * mo[i] / (sqrtf(vo[i]) * inv_bc2_sqrt + eps);
        store(p, dp, c, n, pb);
    }
}

/* Columns as molf_moments_score's, p for g; step: the advanced step counts. win: one byte per expert (the
   routing, flattened); group: each row's param group; hp: 3 doubles per group (lr, weight decay, eps). */
int molf_adamw_update(int64_t n, const int64_t *p, const int64_t *m, const int64_t *v, const int64_t *step,
                      const int64_t *numel, const uint8_t *dp, const uint8_t *dm, const uint8_t *dv,
                      const int64_t *owner, const uint8_t *win, const int64_t *group, const double *hp, double b1,
                      double b2, int threads) {
    int64_t *first = malloc((size_t)(n + 1) * sizeof(int64_t));
    uint8_t *use = malloc((size_t)(n + 1));
    float *coef = malloc((size_t)(4 * n + 1) * sizeof(float));
    if (!first || !use || !coef) { free(first); free(use); free(coef); return -1; }
    for (int64_t i = 0; i < n; i++) {
        use[i] = owner[i] < 0 || win[owner[i]];
        const double *h = hp + 3 * group[i];
        double t = *(const float *)step[i];  /* bias corrections in double: 1 - b2^t cancels in fp32 */
        coef[4 * i] = (float)(h[0] / (1.0 - pow(b1, t)));
        coef[4 * i + 1] = (float)(1.0 / sqrt(1.0 - pow(b2, t)));
        coef[4 * i + 2] = (float)(1.0 - h[0] * h[1]);
        coef[4 * i + 3] = (float)h[2];
    }
    int64_t total = block_table(n, numel, use, first);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < total; b++) {
        int64_t i = tensor_of_block(n, first, b);
        int64_t i0 = (b - first[i]) * BLOCK, i1 = i0 + BLOCK < numel[i] ? i0 + BLOCK : numel[i];
        const float *c = coef + 4 * i;
        block_update((void *)p[i], (void *)m[i], (void *)v[i], dp[i], dm[i], dv[i], i0, i1, c[0], c[1], c[2], c[3]);
    }
    free(first); free(use); free(coef);
    return 0;
}

/* The dropout keep-mask of molf._math.dropout_keep: out[m, k] = u(seed, m, k) >= p for m < rows, k < cols,
   u = (c0 >> 8) / 2^24 with c0 the first word of Philox-4x32-10 for counter (k, m, 0, 0), key (seed mod 2^32,
   seed >> 32); the fused kernels draw the same function where they load x. */
void molf_keep_mask(uint64_t seed, int64_t rows, int64_t cols, float p, uint8_t *out, int threads) {
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *o = out + r * cols;
        for (int64_t k = 0; k < cols; k++) {
            uint32_t c0 = (uint32_t)k, c1 = (uint32_t)r, c2 = 0, c3 = 0, a = k0, b = k1;
            for (int round = 0; round < 10; round++) {
                uint64_t x = (uint64_t)0xD2511F53u * c0, y = (uint64_t)0xCD9E8D57u * c2;
                uint32_t n0 = (uint32_t)(y >> 32) ^ c1 ^ a, n2 = (uint32_t)(x >> 32) ^ c3 ^ b;
                c1 = (uint32_t)y;
                c3 = (uint32_t)x;
                c0 = n0;
                c2 = n2;
                a += 0x9E3779B9u;
                b += 0xBB67AE85u;
            }
            o[k] = (float)(c0 >> 8) * (1.0f / 16777216.0f) >= p;
        }
    }
}
