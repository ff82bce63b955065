/* flopwise's decode step in C: one new token for each of B rows, through every layer, in one call.

   Compiled once per machine by flopwise.infer.native (the system C compiler, -O3 -march=native, OpenMP when
   the compiler has it) and called through ctypes. Why C: a decoded token of a small model is ~40 matrix-vector
   products of a few hundred microseconds each, and in PyTorch every one of the ~150 ops around them costs
   microseconds of dispatch; here the step is the products plus a few loops, and the products read the
   weights at memory speed.

   The model is flopwise's Llama as flopwise.infer.generate.DecodeModel holds it (q, k, v fused into one
   matrix, gate and up into another), weights row-major (out, in): fp32, or int8 with one fp32 scale per
   row (w[o][i] * scale[o]). Activations, the KV cache and the logits are fp32 (except int8 with VNNI, where each
   row of activations is rounded to 8 bits before its product: see dot_u8i8). The arithmetic follows the
   PyTorch decode (Engine._forward and _decode_attention in generate.py): RMSNorm x * rsqrt(mean(x^2) + eps) * weight, rotary embeddings in the rotate-half
   convention from the model's own cos/sin tables, grouped-query attention over positions 0..pos (those a
   row's mask marks), SiLU-gated MLP; sums are reordered for SIMD, so results agree to rounding. */

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const void *w;       /* (rows, cols): float or int8_t */
    const float *scale;  /* (rows,) for int8, else NULL */
    const int32_t *wsum; /* (rows,) for int8: each row's sum of weights (the integer kernel's offset) */
    int32_t rows, cols;
} Mat;

typedef struct {
    const float *attn_norm, *mlp_norm; /* (dim,) */
    Mat qkv, wo, gate_up, down;
    float *keys, *values; /* (rows of the cache, n_kv_heads, seq_len, head_dim): a row's stride is fixed */
} Layer;

typedef struct {
    int32_t dim, n_layers, n_heads, n_kv_heads, head_dim, d_ff, vocab, seq_len, max_batch;
    float eps;
    const float *embed;              /* (vocab, dim) */
    const float *norm;               /* (dim,) */
    Mat head;                        /* (vocab, dim) */
    const float *rope_cos, *rope_sin; /* (seq_len, head_dim) */
    const Layer *layers;
    /* scratch, max_batch rows each */
    float *x, *h, *qkv, *att, *gu, *ff, *scores; /* dim, dim, (nh+2nkv)hd, dim, 2 d_ff, d_ff, nh seq_len */
    uint8_t *xq;                                 /* max(dim, d_ff): a row of activations in 8 bits */
    float *xs;                                   /* 1: its step */
} Model;

static inline float dot_f32(const float *restrict w, const float *restrict x, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

/* int8 weights times fp32 activations. Compilers vectorise the plain loop poorly (the widening to float), so
   x86's AVX-512 and AVX2 get it spelled out: 2.4x faster than the plain loop at 15M on an AMD EPYC. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 widen16(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
static inline float dot_i8(const int8_t *restrict w, const float *restrict x, int n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i q = _mm512_loadu_si512(w + i);
        a0 = _mm512_fmadd_ps(widen16(_mm512_castsi512_si128(q)), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(widen16(_mm512_extracti32x4_epi32(q, 1)), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(widen16(_mm512_extracti32x4_epi32(q, 2)), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(widen16(_mm512_extracti32x4_epi32(q, 3)), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(widen16(_mm_loadu_si128((const __m128i *)(w + i))),
                                                      _mm512_loadu_ps(x + i), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < n; i++) s += (float)w[i] * x[i];
    return s;
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 widen8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}
static inline float dot_i8(const int8_t *restrict w, const float *restrict x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(widen8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(widen8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float lanes[8], s = 0.0f;
    _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a1));
    for (int j = 0; j < 8; j++) s += lanes[j];
    for (; i < n; i++) s += (float)w[i] * x[i];
    return s;
}
#else
static inline float dot_i8(const int8_t *restrict w, const float *restrict x, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += (float)w[i] * x[i];
    return s;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
/* With VNNI, int8 rows multiply 8-bit activations in integers, 64 products an instruction, as llama.cpp's q8_0
   does: on one core of an AMD EPYC this ran 1.8x the widening kernel above, which is bound by its instructions,
   not by memory. Each row of activations is rounded to steps of max|x| / 127 (8 bits, symmetric; PyTorch's int8
   rounds them too), stored offset by 128 as the unsigned operand; y = step * scale * (sum u w - 128 sum w). */
#define FW_VNNI 1
static inline int32_t dot_u8i8(const int8_t *restrict w, const uint8_t *restrict u, int n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    int i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(u + i), _mm512_loadu_si512(w + i));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(u + i + 64), _mm512_loadu_si512(w + i + 64));
    }
    for (; i + 64 <= n; i += 64) a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(u + i), _mm512_loadu_si512(w + i));
    int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
    for (; i < n; i++) s += (int32_t)u[i] * w[i];
    return s;
}

/* Returns the step, NaN where the row holds a NaN or an infinity (so that the products are NaN, as fp32's are). */
static float quantize_row(uint8_t *restrict u, const float *restrict x, int n) {
    float amax = 0.0f;
    int finite = 1;
    for (int i = 0; i < n; i++) {
        amax = fmaxf(amax, fabsf(x[i]));
        finite &= isfinite(x[i]);
    }
    if (!finite) return NAN;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < n; i++) u[i] = (uint8_t)(128 + (int)rintf(x[i] * inv)); /* rintf: to nearest, ties even */
    return amax / 127.0f;
}
#endif

/* y (B, rows) = x (B, cols) W^T. Threads split the output rows, so each reads its share of W once for all B
   rows of x (which stay in cache). */
static void matmul(float *restrict y, const Mat *m, const float *restrict x, int batch, int threads, const Model *md) {
    const int rows = m->rows, cols = m->cols;
#ifdef FW_VNNI
    if (m->scale) {
        for (int b = 0; b < batch; b++) md->xs[b] = quantize_row(md->xq + (int64_t)b * cols, x + (int64_t)b * cols, cols);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int o = 0; o < rows; o++) {
            const int8_t *w = (const int8_t *)m->w + (int64_t)o * cols;
            for (int b = 0; b < batch; b++) {
                const int32_t dot = dot_u8i8(w, md->xq + (int64_t)b * cols, cols) - 128 * m->wsum[o];
                y[(int64_t)b * rows + o] = (float)dot * md->xs[b] * m->scale[o];
            }
        }
        return;
    }
#else
    (void)md;
#endif
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int o = 0; o < rows; o++) {
        if (m->scale) {
            const int8_t *w = (const int8_t *)m->w + (int64_t)o * cols;
            for (int b = 0; b < batch; b++) y[(int64_t)b * rows + o] = dot_i8(w, x + (int64_t)b * cols, cols) * m->scale[o];
        } else {
            const float *w = (const float *)m->w + (int64_t)o * cols;
            for (int b = 0; b < batch; b++) y[(int64_t)b * rows + o] = dot_f32(w, x + (int64_t)b * cols, cols);
        }
    }
}

static void rmsnorm(float *restrict out, const float *restrict x, const float *restrict weight, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * weight[i];
}

/* Rotate pairs (i, i + hd/2) of one head in place by the angles of one position. */
static void rope(float *restrict v, const float *restrict c, const float *restrict s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* Which build this is, for flopwise's notes and tests: bit 0 OpenMP threads, bit 1 the AVX2 int8 kernel,
   bit 2 the AVX-512 one, bit 3 VNNI's integer one (int8 activations). */
int fw_build(void) {
    int bits = 0;
#ifdef _OPENMP
    bits |= 1;
#endif
#if defined(__AVX512F__)
    bits |= 4;
#elif defined(__AVX2__) && defined(__FMA__)
    bits |= 2;
#endif
#ifdef FW_VNNI
    bits |= 8;
#endif
    return bits;
}

/* One decoded token for each of ``batch`` rows at position ``pos``: tokens (batch,), mask (batch, seq_len) of
   0/1 marking the keys a row may attend to, or NULL for all of 0..pos; logits (batch, vocab) out. The keys and
   values of ``pos`` are written into the cache. Returns 0, or -1 for arguments out of range. */
int fw_step(const Model *m, int batch, const int64_t *tokens, int pos, const uint8_t *mask, float *logits,
            int threads) {
    const int d = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, ctx = m->seq_len;
    const int n_qkv = (nh + 2 * nkv) * hd, dff = m->d_ff, group = nh / nkv;
    if (batch < 1 || batch > m->max_batch || pos < 0 || pos >= ctx) return -1;
    for (int b = 0; b < batch; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -1;
        memcpy(m->x + (int64_t)b * d, m->embed + tokens[b] * d, sizeof(float) * d);
    }
    const float *rc = m->rope_cos + (int64_t)pos * hd, *rs = m->rope_sin + (int64_t)pos * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t row_stride = (int64_t)nkv * ctx * hd;
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = m->layers + l;
        for (int b = 0; b < batch; b++) rmsnorm(m->h + (int64_t)b * d, m->x + (int64_t)b * d, L->attn_norm, d, m->eps);
        matmul(m->qkv, &L->qkv, m->h, batch, threads, m);
        for (int b = 0; b < batch; b++) {
            float *q = m->qkv + (int64_t)b * n_qkv, *k = q + nh * hd, *v = k + nkv * hd;
            for (int j = 0; j < nh + nkv; j++) rope(q + j * hd, rc, rs, hd); /* q's heads, then k's */
            for (int j = 0; j < nkv; j++) {
                const int64_t at = b * row_stride + ((int64_t)j * ctx + pos) * hd;
                memcpy(L->keys + at, k + j * hd, sizeof(float) * hd);
                memcpy(L->values + at, v + j * hd, sizeof(float) * hd);
            }
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && batch * nh * pos > 4096)
        for (int bh = 0; bh < batch * nh; bh++) {
            const int b = bh / nh, head = bh % nh, kvh = head / group;
            const float *q = m->qkv + (int64_t)b * n_qkv + head * hd;
            const float *keys = L->keys + b * row_stride + (int64_t)kvh * ctx * hd;
            const float *values = L->values + b * row_stride + (int64_t)kvh * ctx * hd;
            const uint8_t *ok = mask ? mask + (int64_t)b * ctx : NULL;
            float *s = m->scores + (int64_t)bh * ctx, top = -INFINITY;
            for (int t = 0; t <= pos; t++) {
                s[t] = (!ok || ok[t]) ? dot_f32(q, keys + (int64_t)t * hd, hd) * scale : -INFINITY;
                if (s[t] > top) top = s[t];
            }
            float total = 0.0f;
            for (int t = 0; t <= pos; t++) total += (s[t] = expf(s[t] - top)); /* masked: exp(-inf) = 0 */
            float *y = m->att + (int64_t)b * d + head * hd;
            memset(y, 0, sizeof(float) * hd);
            for (int t = 0; t <= pos; t++) {
                const float p = s[t] / total;
                const float *vt = values + (int64_t)t * hd;
#pragma omp simd
                for (int i = 0; i < hd; i++) y[i] += p * vt[i];
            }
        }
        matmul(m->h, &L->wo, m->att, batch, threads, m);
        for (int64_t i = 0; i < (int64_t)batch * d; i++) m->x[i] += m->h[i];
        for (int b = 0; b < batch; b++) rmsnorm(m->h + (int64_t)b * d, m->x + (int64_t)b * d, L->mlp_norm, d, m->eps);
        matmul(m->gu, &L->gate_up, m->h, batch, threads, m);
        for (int b = 0; b < batch; b++) {
            const float *g = m->gu + (int64_t)b * 2 * dff, *u = g + dff;
            float *f = m->ff + (int64_t)b * dff;
            for (int i = 0; i < dff; i++) f[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        matmul(m->h, &L->down, m->ff, batch, threads, m);
        for (int64_t i = 0; i < (int64_t)batch * d; i++) m->x[i] += m->h[i];
    }
    for (int b = 0; b < batch; b++) rmsnorm(m->h + (int64_t)b * d, m->x + (int64_t)b * d, m->norm, d, m->eps);
    matmul(logits, &m->head, m->h, batch, threads, m);
    return 0;
}
