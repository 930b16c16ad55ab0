/* The CPU loops molf/_cpu.py builds and loads: the eager optimizer's step over every tensor, and the dropout
   keep-mask.

   moments:   m <- m + (1 - b1)(g - m),  v <- b2 v + (1 - b2) g^2,  step <- step + 1  (in place), and per
              expert e: sum over its tensors of m^2/(sqrt(v) + 1e-8) (EPD) or (m/(sqrt(v) + 1e-8))^2 (PFN),
              read from the stored (rounded) moments, fp32 terms summed per block, blocks in double.
   routing:   molf._math.route's, per layer (route_layer).
   update:    p <- p (1 - lr wd) - lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps) for tensors outside
              MoLF layers and those whose expert won (win[owner]); the rest are not touched.
   molf_routed_step does all three in one call, a run of layers at a time; molf_moments_score and
   molf_adamw_update are the passes apart (for a collective between them).

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

/* A table of n rows (one per tensor): pointers g, p, m, v, step (an fp32 scalar), numel, dtype codes dg, dp, dm,
   dv, owner (expert index layer * n_experts + e; < 0: a parameter outside MoLF layers, no score), param group. */
typedef struct {
    int64_t n;
    const int64_t *g, *p, *m, *v, *step, *numel, *owner, *group;
    const uint8_t *dg, *dp, *dm, *dv;
} Rows;

/* Scratch for n rows: first blocks, block partial sums, per-row update coefficients. */
typedef struct {
    int64_t *first;
    uint8_t *use;
    double *part;
    float *coef;
} Scratch;

static void scratch_free(Scratch *s) { free(s->first); free(s->use); free(s->part); free(s->coef); }

static int scratch_alloc(Scratch *s, const Rows *R) {
    int64_t blocks = 0;
    for (int64_t i = 0; i < R->n; i++) blocks += (R->numel[i] + BLOCK - 1) / BLOCK;
    s->first = malloc((size_t)(R->n + 1) * sizeof(int64_t));
    s->use = malloc((size_t)(R->n + 1));
    s->part = malloc((size_t)(blocks + 1) * sizeof(double));
    s->coef = malloc((size_t)(4 * R->n + 4) * sizeof(float));
    if (s->first && s->use && s->part && s->coef) return 0;
    scratch_free(s);
    return -1;
}

/* Rows [r0, r1): moments advanced, steps advanced, score sums added to sums[owner]. */
static void moments_rows(const Rows *R, int64_t r0, int64_t r1, Scratch *S, double b1, double b2, int score,
                         double *sums, int threads) {
    int64_t n = r1 - r0, *first = S->first;
    for (int64_t i = 0; i < n; i++) S->use[i] = 1;
    int64_t total = block_table(n, R->numel + r0, S->use, first);
    float omb1 = (float)(1.0 - b1), b2f = (float)b2, omb2 = (float)(1.0 - b2);
    double *part = S->part;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < total; b++) {
        int64_t i = r0 + tensor_of_block(n, first, b), len = R->numel[i];
        int64_t i0 = (b - first[i - r0]) * BLOCK, i1 = i0 + BLOCK < len ? i0 + BLOCK : len;
        part[b] = block_moments((void *)R->g[i], (void *)R->m[i], (void *)R->v[i], R->dg[i], R->dm[i], R->dv[i], i0,
                                i1, omb1, b2f, omb2, R->owner[i] < 0 ? -1 : score);
    }
    for (int64_t k = 0; k < n; k++) {
        int64_t i = r0 + k;
        *(float *)R->step[i] += 1.0f;
        if (R->owner[i] < 0) continue;
        int64_t end = k + 1 < n ? first[k + 1] : total;
        double s = 0.0;
        for (int64_t b = first[k]; b < end; b++) s += part[b];
        sums[R->owner[i]] += s;
    }
}

/* Rows [r0, r1) outside MoLF layers or whose expert won: p <- p decay - step_size m / (sqrt(v) inv_bc2_sqrt + eps). */
static void update_rows(const Rows *R, int64_t r0, int64_t r1, Scratch *S, const uint8_t *win, const double *hp,
                        double b1, double b2, int threads) {
    int64_t n = r1 - r0, *first = S->first;
    for (int64_t k = 0; k < n; k++) {
        int64_t i = r0 + k;
        S->use[k] = R->owner[i] < 0 || win[R->owner[i]];
        const double *h = hp + 3 * R->group[i];
        double t = *(const float *)R->step[i];  /* bias corrections in double: 1 - b2^t cancels in fp32 */
        float *c = S->coef + 4 * k;
        c[0] = (float)(h[0] / (1.0 - pow(b1, t)));
        c[1] = (float)(1.0 / sqrt(1.0 - pow(b2, t)));
        c[2] = (float)(1.0 - h[0] * h[1]);
        c[3] = (float)h[2];
    }
    int64_t total = block_table(n, R->numel + r0, S->use, first);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < total; b++) {
        int64_t k = tensor_of_block(n, first, b), i = r0 + k, len = R->numel[i];
        int64_t i0 = (b - first[k]) * BLOCK, i1 = i0 + BLOCK < len ? i0 + BLOCK : len;
        const float *c = S->coef + 4 * k;
        block_update((void *)R->p[i], (void *)R->m[i], (void *)R->v[i], R->dp[i], R->dm[i], R->dv[i], i0, i1, c[0], c[1],
                     c[2], c[3]);
    }
}

/* molf._math.route for one layer of E experts: S_e = lr_e inv_n_e sum_e (EPD) or sqrt(sum_e) inv_n_e (PFN) in
   fp32, -inf without gradients; the top_k by (finite, then non-finite, then no gradient; higher score; lower
   index) win, never one without gradients. */
static void route_layer(const double *sums, const float *inv_n, const uint8_t *no_grad, const float *lr, int64_t E,
                        int score, int64_t top_k, float *S, uint8_t *win) {
    for (int64_t e = 0; e < E; e++) {
        float s = (float)sums[e];
        s = score == 0 ? s * inv_n[e] * lr[e] : sqrtf(s) * inv_n[e];
        S[e] = no_grad[e] ? -INFINITY : s;
        win[e] = 0;
    }
    for (int64_t k = 0; k < top_k; k++) {
        int64_t best = -1;
        int best_cls = -1;
        float best_key = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            if (win[e]) continue;
            int cls = no_grad[e] ? 0 : isfinite(S[e]) ? 2 : 1;
            float key = isfinite(S[e]) ? S[e] : 0.0f;
            if (cls > best_cls || (cls == best_cls && key > best_key)) best = e, best_cls = cls, best_key = key;
        }
        if (best < 0) break;
        win[best] = 1;
    }
    for (int64_t e = 0; e < E; e++) win[e] = win[e] && !no_grad[e];
}

/* route_layer over n_layers layers (sums, inv_n, no_grad, scores, win: n_layers x n_experts). */
void molf_route(int64_t n_layers, int64_t n_experts, const double *sums, const float *inv_n, const uint8_t *no_grad,
                const float *lr, int score, int64_t top_k, float *scores, uint8_t *win) {
    for (int64_t l = 0, o = 0; l < n_layers; l++, o += n_experts)
        route_layer(sums + o, inv_n + o, no_grad + o, lr, n_experts, score, top_k, scores + o, win + o);
}

static Rows rows_of(int64_t n, const int64_t *g, const int64_t *p, const int64_t *m, const int64_t *v,
                    const int64_t *step, const int64_t *numel, const uint8_t *dg, const uint8_t *dp, const uint8_t *dm,
                    const uint8_t *dv, const int64_t *owner, const int64_t *group) {
    Rows R = {n, g, p, m, v, step, numel, owner, group, dg, dp, dm, dv};
    return R;
}

/* The table's moments and score sums: sums (one double per expert) added to. score: 0 EPD, 1 PFN. Returns 0,
   or -1 when out of memory (then nothing was changed). */
int molf_moments_score(int64_t n, const int64_t *g, const int64_t *m, const int64_t *v, const int64_t *step,
                       const int64_t *numel, const uint8_t *dg, const uint8_t *dm, const uint8_t *dv,
                       const int64_t *owner, double b1, double b2, int score, double *sums, int threads) {
    Rows R = rows_of(n, g, NULL, m, v, step, numel, dg, NULL, dm, dv, owner, NULL);
    Scratch S;
    if (scratch_alloc(&S, &R)) return -1;
    moments_rows(&R, 0, n, &S, b1, b2, score, sums, threads);
    scratch_free(&S);
    return 0;
}

/* The update of rows outside MoLF layers and rows whose expert won (win: one byte per expert, the routing
   flattened); hp: 3 doubles per param group (lr, weight decay, eps); steps already advanced. */
int molf_adamw_update(int64_t n, const int64_t *p, const int64_t *m, const int64_t *v, const int64_t *step,
                      const int64_t *numel, const uint8_t *dp, const uint8_t *dm, const uint8_t *dv,
                      const int64_t *owner, const uint8_t *win, const int64_t *group, const double *hp, double b1,
                      double b2, int threads) {
    Rows R = rows_of(n, NULL, p, m, v, step, numel, NULL, dp, dm, dv, owner, group);
    Scratch S;
    if (scratch_alloc(&S, &R)) return -1;
    update_rows(&R, 0, n, &S, win, hp, b1, b2, threads);
    scratch_free(&S);
    return 0;
}

/* The whole routed step in one call: moments and sums, routing (route_layer), the winners' update, taken a run
   of whole layers of about `run_bytes` of tensors at a time, so the update reads m and v back from cache.
   Rows of MoLF experts come first, ordered by owner (layer-major), then rows outside MoLF layers (owner < 0).
   Per expert (n_layers x n_experts): inv_n, no_grad (in), sums (zeroed here), scores, win (out); lr: per
   expert index e. Returns the number of non-finite scores of experts with gradients, or -1 when out of memory
   (then nothing was changed). */
int64_t molf_routed_step(int64_t n, const int64_t *g, const int64_t *p, const int64_t *m, const int64_t *v,
                     const int64_t *step, const int64_t *numel, const uint8_t *dg, const uint8_t *dp,
                     const uint8_t *dm, const uint8_t *dv, const int64_t *owner, const int64_t *group, const double *hp,
                     double b1, double b2, int score, int64_t n_layers, int64_t n_experts, const float *inv_n,
                     const uint8_t *no_grad, const float *lr, int64_t top_k, double *sums, float *scores,
                     uint8_t *win, int64_t run_bytes, int threads) {
    Rows R = rows_of(n, g, p, m, v, step, numel, dg, dp, dm, dv, owner, group);
    Scratch S;
    if (scratch_alloc(&S, &R)) return -1;
    const int64_t E = n_experts;
    for (int64_t i = 0; i < n_layers * E; i++) sums[i] = 0.0;
    int64_t r = 0, routed = 0;  /* layers [0, routed) are routed */
    while (r < n && owner[r] >= 0) {
        int64_t r1 = r, bytes = 0, layer = owner[r] / E;
        while (r1 < n && owner[r1] >= 0 && (bytes < run_bytes || owner[r1] / E == layer)) {
            layer = owner[r1] / E;
            bytes += numel[r1] * 16;
            r1++;
        }
        moments_rows(&R, r, r1, &S, b1, b2, score, sums, threads);
        molf_route(layer + 1 - routed, E, sums + routed * E, inv_n + routed * E, no_grad + routed * E, lr, score,
                   top_k, scores + routed * E, win + routed * E);
        routed = layer + 1;
        update_rows(&R, r, r1, &S, win, hp, b1, b2, threads);
        r = r1;
    }
    molf_route(n_layers - routed, E, sums + routed * E, inv_n + routed * E, no_grad + routed * E, lr, score, top_k,
               scores + routed * E, win + routed * E);
    if (r < n) {  /* parameters outside MoLF layers: moments and the update, no score */
        moments_rows(&R, r, n, &S, b1, b2, score, sums, threads);
        update_rows(&R, r, n, &S, win, hp, b1, b2, threads);
    }
    scratch_free(&S);
    int64_t nonfinite = 0;
    for (int64_t i = 0; i < n_layers * E; i++) nonfinite += !no_grad[i] && !isfinite(scores[i]);
    return nonfinite;
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
