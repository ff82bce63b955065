/* One training micro-step of flopwise's Llama in C: the forward, the mean cross-entropy and every gradient, in fp32
   or with bf16 products (AVX512_BF16).

   flopwise/model/llama.py is the reference; this file computes the same function and its gradients (the tests hold
   fp32's loss to 1e-6 and its gradients to 1e-4, relative). It exists because the models a sweep trains (d_model
   16-64, 1-2 layers, context 128, about 1,000 tokens a step) spend most of a PyTorch step in operator dispatch and
   in writing and re-reading the logits: here
   a step is some twenty matrix products and a few loops, the logits never leave the cache (the head, the loss and
   its gradient run block by block), and nothing is allocated.

   Layout: activations are row-major (tokens, features); a linear layer's weight is (out, in), as torch stores it.
   Gradients are added to what the caller's buffers hold (gradient accumulation; a tied head adds to the
   embedding's). Built by flopwise/training/native.py with -O3 -march=native (OpenMP where there is one).

   The file ends with the optimizer step (fw_update): gradient clipping, AdamW and Muon on torch's own state. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#ifdef __AVX512F__
#include <immintrin.h>
/* the first n of 16 lanes (n > 0; all of them from 16 on): a row's end, stored or loaded under a mask */
static inline __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }
#endif

/* rows of the two register tiles: 6 x 32 and 12 x 16 accumulate in 12 of AVX-512's 32 registers; elsewhere (AVX2's
   16 registers; other CPUs build the same vector code portably) half as many rows */
#ifdef __AVX512F__
#define MR_WIDE 6
#define MR_NARROW 12
#else
#define MR_WIDE 3
#define MR_NARROW 6
#endif
#define KC 256 /* depth of one pass of a product: a packed panel of B stays in L1/L2 */

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

static int n_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---- matrix products ---- */

/* op(B)[k0:k0+kc, j0:j0+w] into bp (kc x w, zero past column n): op(B)(k, j) = tb ? B[j ldb + k] : B[k ldb + j] */
static void pack_b(const float *b, long ldb, int tb, int k0, int kc, int j0, int n, int w, float *bp) {
    const int cols = imin(w, n - j0);
    if (!tb) {
        for (int k = 0; k < kc; k++) {
            memcpy(bp + (long)k * w, b + (long)(k0 + k) * ldb + j0, sizeof(float) * cols);
            for (int c = cols; c < w; c++) bp[(long)k * w + c] = 0.0f;
        }
        return;
    }
    /* transposed: strided reads, contiguous writes (strided writes ran 2-3x slower) */
    for (int k = 0; k < kc; k++) {
        const float *src = b + (long)j0 * ldb + k0 + k;
        float *dst = bp + (long)k * w;
        for (int c = 0; c < cols; c++) dst[c] = src[(long)c * ldb];
        for (int c = cols; c < w; c++) dst[c] = 0.0f;
    }
}

/* C[rows x cols] (=, or += with accum) sum_k a(r, k) bp[k ldbp + :], a(r, k) = a[r sr + k sk]; the tile is
   MR x 16 NV */
#define TILE(NAME, MR, NV)                                                                                          \
    static void NAME(int kc, const float *a, long sr, long sk, int rows, const float *bp, long ldbp, float *c,      \
                     long ldc, int cols, int accum) {                                                               \
        v16 acc[MR][NV];                                                                                            \
        const float *ar[MR];                                                                                        \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                                     \
            ar[r] = a + (long)(r < rows ? r : rows - 1) * sr; /* rows past the edge repeat the last: not stored */  \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[r][v] = (v16){0};                              \
        }                                                                                                           \
        for (int k = 0; k < kc; k++) {                                                                              \
            const v16u *b = (const v16u *)(bp + (long)k * ldbp);                                                    \
            _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                                 \
                const float x = ar[r][k * sk];                                                                      \
                _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[r][v] += x * b[v];                         \
            }                                                                                                       \
        }                                                                                                           \
        /* unrolled, every index into acc is a constant: the accumulators stay in registers (as TILE16's) */       \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                                     \
            if (r >= rows) break;                                                                                   \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) {                                                  \
                float *dst = c + r * ldc + 16 * v;                                                                  \
                if (cols >= 16 * (v + 1)) {                                                                         \
                    *(v16u *)dst = accum ? *(v16u *)dst + acc[r][v] : acc[r][v];                                    \
                    continue;                                                                                       \
                }                                                                                                   \
                if (cols <= 16 * v) break;                                                                          \
                float tmp[16];                                                                                      \
                memcpy(tmp, &acc[r][v], sizeof(tmp));                                                               \
                for (int j = 0; j < cols - 16 * v; j++) dst[j] = (accum ? dst[j] : 0.0f) + tmp[j];                  \
            }                                                                                                       \
        }                                                                                                           \
    }
TILE(tile_wide, MR_WIDE, 2)
TILE(tile_narrow, MR_NARROW, 1)

/* Scratch of one thread's products: b, the packed panels of B; a, A in bf16 pairs (bf16 products only) */
typedef struct {
    float *b;
    uint32_t *a;
} Scratch;

/* x rounded to bf16 (to nearest, ties to even), as the high half of a float's bits; a NaN stays a NaN */
static inline uint32_t bf16_bits(float x) {
    union {
        float f;
        uint32_t u;
    } v = {.f = x};
    const uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16;
    return (v.u & 0x7fffffffu) > 0x7f800000u ? (v.u >> 16) | 0x40u : rounded; /* a NaN stays a NaN */
}

/* bf16 products (AVX512_BF16's vdpbf16ps: pairs of bf16 multiplied and added into fp32 at twice fp32's rate):
   each operand is rounded to bf16 once per product (to nearest, ties to even) into pairs along k (k even in the
   low half), sums and outputs stay fp32 (bf16 autocast also rounds the outputs). */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_BF16 1

/* dst[i] = (lo[i step] in the low half, hi[i step] in the high half, or 0 without hi) as bf16, for count i, in the
   products' three layouts: pairs along a row (step 2, hi = lo + 1), two rows side by side (step 1) and one row (step
   1, no hi). Through AVX512_BF16's own conversion (32 floats an instruction, the same rounding; it reads denormals
   as 0), the last partial vector under a mask: rows of 16-32 floats (d_model 16-32) are all tail */
static inline void bf16_pairs(const float *lo, const float *hi, long step, int count, uint32_t *dst) {
    if (step == 2) { /* a row's bf16 in order: the pairs are its consecutive elements */
        for (int i = 0; i < count; i += 16) {
            const int floats = 2 * (count - i); /* left in the row */
            const __mmask16 k_lo = lanes(floats), k_hi = floats > 16 ? lanes(floats - 16) : 0;
            const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(k_hi, lo + 2 * i + 16),
                                                      _mm512_maskz_loadu_ps(k_lo, lo + 2 * i));
            _mm512_mask_storeu_epi32(dst + i, lanes(count - i), (__m512i)both);
        }
    } else if (hi) { /* two rows interleaved */
        const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                               22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        for (int i = 0; i < count; i += 16) {
            const __mmask16 k = lanes(count - i);
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(k, hi + i),
                                                              _mm512_maskz_loadu_ps(k, lo + i));
            _mm512_mask_storeu_epi32(dst + i, k, _mm512_permutexvar_epi16(order, both));
        }
    } else { /* one row, zero high halves */
        for (int i = 0; i < count; i += 16) {
            const __mmask16 k = lanes(count - i);
            const __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, lo + i));
            _mm512_mask_storeu_epi32(dst + i, k, _mm512_cvtepu16_epi32(half));
        }
    }
}

/* op(A) (m x kc, from column k0) in pairs along k: a16[i kp + p] (ta = 0) or a16[p m + i] (ta = 1) */
static void convert_a(const float *a, long lda, int ta, int m, int k0, int kc, uint32_t *a16) {
    const int kp = (kc + 1) / 2;
    if (!ta) {
        for (int i = 0; i < m; i++) {
            const float *row = a + (long)i * lda + k0;
            bf16_pairs(row, row + 1, 2, kc / 2, a16 + (long)i * kp);
            if (kc & 1) bf16_pairs(row + kc - 1, 0, 1, 1, a16 + (long)i * kp + kp - 1);
        }
        return;
    }
    for (int p = 0; p < kp; p++) {
        const float *lo = a + (long)(k0 + 2 * p) * lda;
        bf16_pairs(lo, 2 * p + 1 < kc ? lo + lda : 0, 1, m, a16 + (long)p * m);
    }
}

/* op(B)[k0:k0+kc, j0:j0+w] as (kc + 1) / 2 rows of w pairs, zero past column n (kc <= KC) */
static void pack_b16(const float *b, long ldb, int tb, int k0, int kc, int j0, int n, int w, uint32_t *bp) {
    const int cols = imin(w, n - j0), kp = (kc + 1) / 2;
    if (tb) { /* a column of the panel is a row of b, its pairs consecutive there: converted along the row (whole
                 vectors; denormals read as 0, as the other layouts'), then stored down the column (converting
                 strided pairs one at a time ran slower) */
        uint32_t pairs[KC / 2];
        for (int c = 0; c < cols; c++) {
            convert_a(b + (long)(j0 + c) * ldb, ldb, 0, 1, k0, kc, pairs);
            for (int p = 0; p < kp; p++) bp[(long)p * w + c] = pairs[p];
        }
        for (int p = 0; p < kp; p++)
            for (int c = cols; c < w; c++) bp[(long)p * w + c] = 0;
        return;
    }
    for (int p = 0; p < kp; p++) {
        uint32_t *dst = bp + (long)p * w;
        const float *lo = b + (long)(k0 + 2 * p) * ldb + j0;
        bf16_pairs(lo, 2 * p + 1 < kc ? lo + ldb : 0, 1, cols, dst);
        for (int c = cols; c < w; c++) dst[c] = 0;
    }
}

/* as TILE, over kp pairs: a(r, p) = a[r sr + p sp] */
#define TILE16(NAME, MR, NV)                                                                                        \
    static void NAME(int kp, const uint32_t *a, long sr, long sp, int rows, const uint32_t *bp, float *c, long ldc, \
                     int cols, int accum) {                                                                         \
        __m512 acc[MR][NV];                                                                                         \
        const uint32_t *ar[MR];                                                                                     \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                                     \
            ar[r] = a + (long)(r < rows ? r : rows - 1) * sr;                                                       \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();                   \
        }                                                                                                           \
        for (int p = 0; p < kp; p++) {                                                                              \
            __m512bh b[NV];                                                                                         \
            for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(bp + (long)p * 16 * NV + 16 * v);     \
            _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                                 \
                const __m512bh x = (__m512bh)_mm512_set1_epi32((int)ar[r][p * sp]);                                 \
                _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]); \
            }                                                                                                       \
        }                                                                                                           \
        /* unrolled, every index into acc is a constant: the accumulators stay in registers (a loop to `rows` kept  \
           them in memory, zeroed by a call to memset each tile); a partial row is stored under a mask */          \
        _Pragma("GCC unroll 12") for (int r = 0; r < MR; r++) {                                                     \
            if (r >= rows) break;                                                                                   \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) {                                                  \
                if (16 * v >= cols) break;                                                                          \
                const __mmask16 k = lanes(cols - 16 * v);                                                           \
                float *dst = c + r * ldc + 16 * v;                                                                  \
                _mm512_mask_storeu_ps(dst, k, accum ? _mm512_add_ps(_mm512_maskz_loadu_ps(k, dst), acc[r][v])       \
                                                    : acc[r][v]);                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }
TILE16(tile16_wide, MR_WIDE, 2)
TILE16(tile16_narrow, MR_NARROW, 1)
#else
#define HAVE_BF16 0
#endif

/* C (m x n) = op(A) op(B), or += with accum; op(A) is m x k: ta ? A[k lda + i] : A[i lda + k]; op(B) is k x n, as
   pack_b reads it. sc->b: one packed panel (KC x 32 floats), or with lowp all of them ((KC / 2) x round_up(n, 32)
   pairs); with lowp, the product in bf16 where the build has it, sc->a holding m x KC / 2 pairs, and op(B) read
   from packed where given (pack_whole_b16's layout; sc->b is then unused). */
static void gemm_with(int m, int n, int k, const float *a, long lda, int ta, const float *b, long ldb, int tb,
                      float *c, long ldc, int accum, const Scratch *sc, int lowp, const uint32_t *packed) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (!accum)
            for (int i = 0; i < m; i++) memset(c + (long)i * ldc, 0, sizeof(float) * n);
        return;
    }
    const int narrow = n <= 16, w = narrow ? 16 : 32, mr = narrow ? MR_NARROW : MR_WIDE;
    const long sr = ta ? 1 : lda, sk = ta ? lda : 1;
    const int nj = (n + w - 1) / w, ni = (m + mr - 1) / mr;
    float *bp = sc->b;
#if HAVE_BF16
    if (lowp) {
        uint32_t *a16 = sc->a;
        long offset = 0; /* of this pass's panels in packed */
        for (int k0 = 0; k0 < k; k0 += KC) {
            const int kc = imin(KC, k - k0), acc = accum || k0 > 0, kp = (kc + 1) / 2;
            const long sr16 = ta ? 1 : kp, sp16 = ta ? m : 1;
            const uint32_t *bp16 = packed ? packed + offset : (const uint32_t *)bp;
            offset += (long)kp * nj * w;
            convert_a(a, lda, ta, m, k0, kc, a16);
            if (!packed)
                for (int j = 0; j < nj; j++)
                    pack_b16(b, ldb, tb, k0, kc, j * w, n, w, (uint32_t *)bp + (long)j * kp * w);
            for (int j = 0; j < nj; j++)
                for (int i = 0; i < ni; i++) {
                    const uint32_t *ai = a16 + (long)i * mr * sr16, *bj = bp16 + (long)j * kp * w;
                    float *ci = c + (long)i * mr * ldc + (long)j * w;
                    const int rows = imin(mr, m - i * mr), cols = imin(w, n - j * w);
                    if (narrow)
                        tile16_narrow(kp, ai, sr16, sp16, rows, bj, ci, ldc, cols, acc);
                    else
                        tile16_wide(kp, ai, sr16, sp16, rows, bj, ci, ldc, cols, acc);
                }
        }
        return;
    }
#else
    (void)lowp;
    (void)packed;
#endif
    for (int k0 = 0; k0 < k; k0 += KC) {
        const int kc = imin(KC, k - k0), acc = accum || k0 > 0;
        for (int j = 0; j < nj; j++) {
            /* a whole panel of an untransposed B is read where it lies; others are packed (transposed, padded) */
            const int cols = imin(w, n - j * w), direct = !tb && cols == w;
            const float *bj = direct ? b + (long)k0 * ldb + (long)j * w : bp;
            const long ldbj = direct ? ldb : w;
            if (!direct) pack_b(b, ldb, tb, k0, kc, j * w, n, w, bp);
            for (int i = 0; i < ni; i++) {
                const float *ai = a + (ta ? (long)k0 * lda + (long)i * mr : (long)i * mr * lda + k0);
                float *ci = c + (long)i * mr * ldc + (long)j * w;
                const int rows = imin(mr, m - i * mr);
                if (narrow)
                    tile_narrow(kc, ai, sr, sk, rows, bj, ldbj, ci, ldc, cols, acc);
                else
                    tile_wide(kc, ai, sr, sk, rows, bj, ldbj, ci, ldc, cols, acc);
            }
        }
    }
}

static void gemm(int m, int n, int k, const float *a, long lda, int ta, const float *b, long ldb, int tb, float *c,
                 long ldc, int accum, const Scratch *sc, int lowp) {
    gemm_with(m, n, k, a, lda, ta, b, ldb, tb, c, ldc, accum, sc, lowp, 0);
}

/* op(B) (k x n) in bf16 pairs, every panel of every pass as gemm_with's lowp reads them from packed (a B used by
   many products, packed once); returns their count, and with dst 0 only counts */
static long pack_whole_b16(const float *b, long ldb, int tb, int k, int n, uint32_t *dst) {
    const int w = n <= 16 ? 16 : 32, nj = (n + w - 1) / w;
    long at = 0;
    for (int k0 = 0; k0 < k; k0 += KC) {
        const int kc = imin(KC, k - k0), kp = (kc + 1) / 2;
#if HAVE_BF16
        if (dst)
            for (int j = 0; j < nj; j++) pack_b16(b, ldb, tb, k0, kc, j * w, n, w, dst + at + (long)j * kp * w);
#else
        (void)b, (void)ldb, (void)tb, (void)dst;
#endif
        at += (long)kp * nj * w;
    }
    return at;
}

/* A weight in bf16 pairs as gemm_with reads it from `packed` (pack_whole_b16's layout), packed once a call of the
   step (a micro-step, or a batch of the evaluation's) and shared by the threads: fwd for x W^T, back for dy W; 0
   where not packed (fp32 products), and the product packs its own panels */
typedef struct {
    const uint32_t *fwd, *back;
} Packed;

static const Packed unpacked = {0, 0};

/* y = x W^T (x: rows x in, W: out x in), or += */
static void linear(int rows, int out, int in, const float *x, const float *w, const Packed *pw, float *y, int accum,
                   const Scratch *bp, int lowp) {
    gemm_with(rows, out, in, x, in, 0, w, in, 1, y, out, accum, bp, lowp, pw->fwd);
}

/* dx (=, or +=) dy W; gW += dy^T x */
static void linear_back(int rows, int out, int in, const float *x, const float *w, const Packed *pw, const float *dy,
                        float *dx, int dx_accum, float *gw, const Scratch *bp, int lowp) {
    gemm_with(rows, in, out, dy, out, 0, w, in, 0, dx, in, dx_accum, bp, lowp, pw->back);
    gemm(out, in, rows, dy, out, 1, x, in, 0, gw, in, 1, bp, lowp);
}

/* ---- exp for softmax arguments (x <= 0): 2^n p(r), r = x - n ln2, vectorisable ---- */
/* the floor, log2(e), ln2 in two parts and p's coefficients: exp_neg's and exp16's. p(r) = 1 + r + r^2 q(r), q
   cubic, fitted here for the least largest relative error on |r| <= ln2 / 2: 2.1e-7 in fp32 over [-87, 0] (3.5 ulp;
   the degree-7 polynomial it replaced: 1.2e-7, for two more multiply-adds an element) */
#define EXP_FLOOR -87.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO 2.12194440e-4f
#define EXP_P0 8.31253268e-3f
#define EXP_P1 4.18901103e-2f
#define EXP_P2 1.66671137e-1f
#define EXP_P3 4.99992324e-1f

static inline float exp_neg(float x) {
    x = x < EXP_FLOOR ? EXP_FLOOR : x;
    const float n = rintf(x * EXP_LOG2E);
    const float r = x - n * EXP_LN2_HI + n * EXP_LN2_LO;
    float p = EXP_P0;
    p = p * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } u = {.f = p};
    u.i += (int32_t)n << 23;
    return u.f;
}

/* the logistic function, vectorisable: from exp of -|x| */
static inline float sigmoid(float x) {
    const float e = exp_neg(x < 0.0f ? x : -x), r = 1.0f / (1.0f + e);
    return x < 0.0f ? e * r : r;
}

/* ---- softmax rows: max, exponentials and their sum, scaling. A row is often short and of any length (an attention
   row has i + 1 scores), where a compiler's vector loop with a scalar remainder and a reduction per loop costs more
   than the exponentials: with AVX-512 a row runs in whole vectors, masked at its end ---- */
#ifdef __AVX512F__
static inline __m512 exp16(__m512 x) { /* exp_neg, 16 at a time (a NaN stays one: max returns its second operand) */
    x = _mm512_max_ps(_mm512_set1_ps(EXP_FLOOR), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x));
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p 2^n in one instruction (n is whole) */
}

/* the largest of x[0..n) that is not NaN (as the portable loop's comparison skips NaN; row_exp then makes the sum
   NaN) */
static inline float row_max(const float *x, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 16) m = _mm512_max_ps(_mm512_mask_loadu_ps(m, lanes(n - j), x + j), m);
    return _mm512_reduce_max_ps(m);
}

/* x = exp(x scale - shift), in place; returns their sum */
static inline float row_exp(float *x, int n, float scale, float shift) {
    const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps(), sum2 = _mm512_setzero_ps();
    int j = 0;
    for (; j + 32 <= n; j += 32) { /* two vectors a turn into two sums: steps 1.5% faster at d_model 16-32 */
        const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vs, vm));
        const __m512 e2 = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(x + j + 16), vs, vm));
        _mm512_storeu_ps(x + j, e);
        _mm512_storeu_ps(x + j + 16, e2);
        sum = _mm512_add_ps(sum, e);
        sum2 = _mm512_add_ps(sum2, e2);
    }
    for (; j < n; j += 16) {
        const __mmask16 k = lanes(n - j);
        const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, x + j), vs, vm));
        _mm512_mask_storeu_ps(x + j, k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(sum, sum2));
}

static inline void row_scale(float *x, int n, float c) {
    const __m512 vc = _mm512_set1_ps(c);
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = lanes(n - j);
        _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), vc));
    }
}

/* attention's backward, one row: p = exp(p scale - lse), ds = p (ds - dd) scale */
static inline void row_softmax_back(float *p, float *ds, int n, float scale, float lse, float dd) {
    const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse), vd = _mm512_set1_ps(dd);
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = lanes(n - j);
        const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, p + j), vs, vl));
        _mm512_mask_storeu_ps(p + j, k, e);
        const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, ds + j), vd);
        _mm512_mask_storeu_ps(ds + j, k, _mm512_mul_ps(_mm512_mul_ps(e, d), vs));
    }
}
#else
static inline float row_max(const float *x, int n) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}

static inline float row_exp(float *x, int n, float scale, float shift) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        x[j] = exp_neg(x[j] * scale - shift);
        sum += x[j];
    }
    return sum;
}

static inline void row_scale(float *x, int n, float c) {
#pragma omp simd
    for (int j = 0; j < n; j++) x[j] *= c;
}

static inline void row_softmax_back(float *p, float *ds, int n, float scale, float lse, float dd) {
#pragma omp simd
    for (int j = 0; j < n; j++) {
        p[j] = exp_neg(p[j] * scale - lse);
        ds[j] = p[j] * (ds[j] - dd) * scale;
    }
}
#endif

/* ---- the model ---- */

typedef struct {
    const float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
    float *g_attn_norm, *g_wq, *g_wk, *g_wv, *g_wo, *g_mlp_norm, *g_gate, *g_up, *g_down;
} Layer;

typedef struct {
    int dim, n_layers, n_heads, n_kv_heads, head_dim, d_ff, vocab, seq_len;
    int bf16;  /* every product in bf16: the linear layers', the head's, attention's (a build with fw_build() bit 2) */
    int seqs_per_pass; /* sequences a thread runs forward and backward at a time (0: its whole share): activations
                          that stay in the core's cache, against more passes over the weights (changes the order of
                          the gradients' sums only) */
    float eps;
    const float *embed, *norm, *head, *rope_cos, *rope_sin; /* head == embed when tied */
    float *g_embed, *g_norm, *g_head;                        /* g_head == g_embed when tied */
    const Layer *layers;
} Net;

/* one thread's workspace, carved from its share of the buffer of fw_train_floats() floats */
typedef struct {
    float *xin, *h1, *q, *k, *v, *att, *xmid, *h2, *a, *u, *rstd1, *rstd2, *lse; /* per layer: saved */
    float *xf, *hf, *rstdf, *dx, *dh, *datt, *dq, *dk, *dv, *da, *du, *s;
    float *bp;     /* packing scratch */
    uint32_t *ap;  /* A in bf16 pairs (bf16 products only) */
    float *scores; /* attention: two T x T; the head: a block of logits */
    float *kt;     /* attention: one head's keys and values, transposed */
} Work;

static int ce_rows(const Net *m) { /* rows of logits per block of the head: about 256 KB */
    int r = 65536 / (m->vocab > 0 ? m->vocab : 1);
    r = r < 12 ? 12 : r > 96 ? 96 : r;
    return r / 12 * 12;
}

/* floats of one thread's workspace for n tokens; with w, its fields point into base */
static long carve(const Net *m, long n, float *base, Work *w) {
    const long d = m->dim, kvd = (long)m->n_kv_heads * m->head_dim, f = m->d_ff, L = m->n_layers, t = m->seq_len;
    const long h = m->n_heads;
    long at = 0;
#define TAKE(field, count) (w ? (w->field = base + at) : 0, at += ((count) + 15) / 16 * 16)
    TAKE(xin, L * n * d); TAKE(h1, L * n * d); TAKE(q, L * n * d); TAKE(k, L * n * kvd); TAKE(v, L * n * kvd);
    TAKE(att, L * n * d); TAKE(xmid, L * n * d); TAKE(h2, L * n * d); TAKE(a, L * n * f); TAKE(u, L * n * f);
    TAKE(rstd1, L * n); TAKE(rstd2, L * n); TAKE(lse, L * n * h);
    TAKE(xf, n * d); TAKE(hf, n * d); TAKE(rstdf, n); TAKE(dx, n * d); TAKE(dh, n * d); TAKE(datt, n * d);
    TAKE(dq, n * d); TAKE(dk, n * kvd); TAKE(dv, n * kvd); TAKE(da, n * f); TAKE(du, n * f); TAKE(s, n * f);
    long widest = m->vocab;
    if (f > widest) widest = f;
    if (d > widest) widest = d;
    if (t > widest) widest = t;
    const long logits = (long)ce_rows(m) * m->vocab;
    const long panels = (long)(KC / 2) * round_up((int)widest, 32); /* bf16: every panel of a product at once */
    TAKE(bp, m->bf16 && panels > KC * 32 ? panels : KC * 32);           /* fp32: one panel at a time */
    long tallest = n > widest ? n : widest; /* the most rows a product's A has: tokens, vocabulary or d_ff */
    if (m->bf16) {
        if (w) w->ap = (uint32_t *)(base + at);
        at += (tallest + 15) / 16 * 16 * (KC / 2);
    } else if (w) {
        w->ap = 0;
    }
    TAKE(scores, 2 * t * t > logits ? 2 * t * t : logits);
    TAKE(kt, 2L * m->head_dim * t);
#undef TAKE
    return at;
}

/* The gradient buffers' fields of m (whose layers are the writable array `layers`), in one order, with their
   floats: slot[c] is the address of a g_ pointer. A tied head shares the embedding's buffer and is listed once.
   The caller's buffers are read, and a chunk's own ones laid out, through the same list. */
static int grad_slots(Net *m, Layer *layers, float **slot[], long size[]) {
    const long d = m->dim, kvd = (long)m->n_kv_heads * m->head_dim, f = m->d_ff, v = m->vocab;
    int c = 0;
#define ADD(field, count) (slot[c] = &(field), size[c++] = (count))
    ADD(m->g_embed, v * d);
    if (m->g_head != m->g_embed) ADD(m->g_head, v * d);
    ADD(m->g_norm, d);
    for (int l = 0; l < m->n_layers; l++) {
        Layer *y = &layers[l];
        ADD(y->g_attn_norm, d); ADD(y->g_wq, d * d); ADD(y->g_wk, kvd * d); ADD(y->g_wv, kvd * d);
        ADD(y->g_wo, d * d); ADD(y->g_mlp_norm, d); ADD(y->g_gate, f * d); ADD(y->g_up, f * d);
        ADD(y->g_down, d * f);
    }
#undef ADD
    return c;
}

#define MAX_SLOTS(m) (3 + 9 * (m)->n_layers)

static long grad_floats(const Net *m) {
    Layer layers[m->n_layers];
    Net copy = *m;
    memcpy(layers, m->layers, sizeof(Layer) * m->n_layers);
    float **slot[MAX_SLOTS(m)];
    long size[MAX_SLOTS(m)], total = 0;
    const int count = grad_slots(&copy, layers, slot, size);
    for (int c = 0; c < count; c++) total += size[c];
    return total;
}

/* one chunk's workspace: its activations and, split across threads, its own gradients (each chunk's share starts
   on a 64-byte cache line) */
static long share_floats(const Net *m, long rows, int chunks) {
    return carve(m, rows, 0, 0) + (chunks > 1 ? (grad_floats(m) + 15) / 16 * 16 : 0);
}

/* The products' weights in bf16 pairs, packed once a call (bf16 products only). Every pass of every thread
   multiplies by the same weights, and packing a weight for x W^T cost up to a third of the product itself at 256
   rows. Weights in one order: the head, then each layer's P_LAYER. */
enum { P_WQ, P_WK, P_WV, P_WO, P_GATE, P_UP, P_DOWN, P_LAYER };
#define MAX_WEIGHTS(m) (1 + P_LAYER * (m)->n_layers)

/* the weights (out x in) in that order; returns their count */
static int weight_list(const Net *m, const float *w[], int out[], int in[]) {
    const int d = m->dim, kvd = m->n_kv_heads * m->head_dim, f = m->d_ff;
    int c = 0;
#define ADD(weight, rows, cols) (w[c] = (weight), out[c] = (rows), in[c++] = (cols))
    ADD(m->head, m->vocab, d);
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *y = &m->layers[l];
        ADD(y->wq, d, d); ADD(y->wk, kvd, d); ADD(y->wv, kvd, d); ADD(y->wo, d, d);
        ADD(y->w_gate, f, d); ADD(y->w_up, f, d); ADD(y->w_down, d, f);
    }
#undef ADD
    return c;
}

/* floats of the packed weights (the fwd packs, then the back ones, from base), and with pk, where each lies; 0
   without bf16 products */
static long lay_out_packs(const Net *m, uint32_t *base, Packed *pk) {
    if (!(m->bf16 && HAVE_BF16)) return 0;
    const float *w[MAX_WEIGHTS(m)];
    int out[MAX_WEIGHTS(m)], in[MAX_WEIGHTS(m)];
    const int count = weight_list(m, w, out, in);
    long at = 0;
    for (int back = 0; back < 2; back++)
        for (int c = 0; c < count; c++) {
            if (pk) *(back ? &pk[c].back : &pk[c].fwd) = base + at;
            at += back ? pack_whole_b16(0, 0, 0, out[c], in[c], 0) : pack_whole_b16(0, 0, 1, in[c], out[c], 0);
        }
    return (at + 15) / 16 * 16;
}

/* pack thread id's share of the weights where pk lays them out: the fwd packs, and with back the back ones. Each
   goes to the thread with the least work so far (the head, often the largest, first; a fwd pack, transposed, costs
   about 8 back ones of its size), reckoned alike on every thread of the team. */
static void pack_weights(const Net *m, const Packed *pk, int back, int id, int team) {
    const float *w[MAX_WEIGHTS(m)];
    int out[MAX_WEIGHTS(m)], in[MAX_WEIGHTS(m)];
    const int count = weight_list(m, w, out, in);
    long load[team];
    for (int t = 0; t < team; t++) load[t] = 0;
    for (int c = 0; c < count; c++)
        for (int dir = 0; dir <= back; dir++) {
            int least = 0;
            for (int t = 1; t < team; t++) least = load[t] < load[least] ? t : least;
            load[least] += (long)out[c] * in[c] * (dir ? 1 : 8);
            if (least != id) continue;
            if (dir)
                pack_whole_b16(w[c], in[c], 0, out[c], in[c], (uint32_t *)pk[c].back);
            else
                pack_whole_b16(w[c], in[c], 1, in[c], out[c], (uint32_t *)pk[c].fwd);
        }
}

/* chunks a step of b sequences splits into, one a thread (each takes whole sequences) */
static int step_threads(int b) { return imin(n_threads(), b); }

/* sequences a thread runs forward and backward at a time, of its share of b */
static int pass_seqs(const Net *m, int b) {
    return m->seqs_per_pass > 0 && m->seqs_per_pass < b ? m->seqs_per_pass : b;
}

/* floats of workspace for a step of b sequences of t tokens with this process' threads: the packed weights
   (bf16), then each thread's share, and with more than one, each thread's own gradients */
long fw_train_floats(const Net *m, int b, int t) {
    const int th = step_threads(b), per = pass_seqs(m, (b + th - 1) / th);
    return lay_out_packs(m, 0, 0) + th * share_floats(m, (long)per * t, th);
}

void fw_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

/* h = x rstd g, rstd = 1 / sqrt(mean(x^2) + eps) */
static void rmsnorm(int n, int d, const float *x, const float *g, float eps, float *h, float *rstd) {
    for (int i = 0; i < n; i++) {
        const float *xi = x + (long)i * d;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int j = 0; j < d; j++) ss += xi[j] * xi[j];
        const float r = 1.0f / sqrtf(ss / d + eps);
        rstd[i] = r;
#pragma omp simd
        for (int j = 0; j < d; j++) h[(long)i * d + j] = xi[j] * r * g[j];
    }
}

/* dx += d(rmsnorm)/dx^T dh; gg += sum_i dh x rstd */
static void rmsnorm_back(int n, int d, const float *x, const float *g, const float *rstd, const float *dh, float *dx,
                         float *gg) {
    for (int i = 0; i < n; i++) {
        const float *xi = x + (long)i * d, *di = dh + (long)i * d;
        const float r = rstd[i];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < d; j++) dot += di[j] * g[j] * xi[j];
        const float c = dot * r * r * r / d;
#pragma omp simd
        for (int j = 0; j < d; j++) {
            dx[(long)i * d + j] += r * di[j] * g[j] - c * xi[j];
            gg[j] += di[j] * xi[j] * r;
        }
    }
}

/* rotate-half rotary embedding of each head of x (n rows of heads x hd, position = row mod t), in place; back:
   the transposed rotation (gradients) */
static void rope(int n, int t, int heads, int hd, float *x, const float *cos_t, const float *sin_t, int back) {
    const int half = hd / 2;
    for (int i = 0; i < n; i++) {
        const float *c = cos_t + (long)(i % t) * hd, *s = sin_t + (long)(i % t) * hd;
        for (int hh = 0; hh < heads; hh++) {
            float *x1 = x + ((long)i * heads + hh) * hd, *x2 = x1 + half;
#pragma omp simd
            for (int e = 0; e < half; e++) {
                const float a = x1[e], b = x2[e];
                if (!back) {
                    x1[e] = a * c[e] - b * s[e];
                    x2[e] = b * c[e + half] + a * s[e + half];
                } else {
                    x1[e] = a * c[e] + b * s[e + half];
                    x2[e] = b * c[e + half] - a * s[e];
                }
            }
        }
    }
}

/* the causal scores q k^T of one sequence and head into s (t x t; only j <= i is computed where a block allows) */
/* Causal products skip the upper triangle a block of CB rows (or columns) at a time: rows i0..i0+CB read, or
   write, only columns below i0 + CB. */
#define CB 32

/* bt (hd x t) = b^T, b: t x hd with row stride ldb: the products below then read it where it lies */
static void transpose(int t, int hd, const float *b, long ldb, float *bt) {
    for (int e = 0; e < hd; e++)
        for (int j = 0; j < t; j++) bt[(long)e * t + j] = b[(long)j * ldb + e];
}

/* attention's causal products, in bf16 with lowp (a bf16 step's: as flash attention's on GPUs; the softmax between
   them stays fp32). s (t x t, row stride t) = a b for rows i and columns j <= i of each block; a: t x hd, b: hd x t
   (a transpose) */
static void causal_ab(int t, int hd, const float *a, long lda, const float *b, float *s, const Scratch *bp, int lowp) {
    for (int i0 = 0; i0 < t; i0 += CB) {
        const int rows = imin(CB, t - i0);
        gemm(rows, i0 + rows, hd, a + (long)i0 * lda, lda, 0, b, t, 0, s + (long)i0 * t, t, 0, bp, lowp);
    }
}

/* out (t x hd, =) = s b, s lower-triangular (t x t) */
static void causal_sb(int t, int hd, const float *s, const float *b, long ldb, float *out, long ldo, const Scratch *bp,
                      int lowp) {
    for (int i0 = 0; i0 < t; i0 += CB) {
        const int rows = imin(CB, t - i0);
        gemm(rows, hd, i0 + rows, s + (long)i0 * t, t, 0, b, ldb, 0, out + (long)i0 * ldo, ldo, 0, bp, lowp);
    }
}

/* out (t x hd, +=) = s^T b, s lower-triangular (t x t): row j of out sums rows i >= j of s */
static void causal_stb(int t, int hd, const float *s, const float *b, long ldb, float *out, long ldo, const Scratch *bp,
                       int lowp) {
    for (int j0 = 0; j0 < t; j0 += CB) {
        const int cols = imin(CB, t - j0);
        gemm(cols, hd, t - j0, s + (long)j0 * t + j0, t, 1, b + (long)j0 * ldb, ldb, 0, out + (long)j0 * ldo, ldo, 1,
             bp, lowp);
    }
}

static void attention(const Net *m, int b, int t, const Work *w, int l, float *out, float *lse_out) {
    const int h = m->n_heads, hk = m->n_kv_heads, hd = m->head_dim, d = m->dim, kvd = hk * hd;
    const long n = (long)b * t;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *q = w->q + l * n * d, *k = w->k + l * n * kvd, *v = w->v + l * n * kvd;
    for (int bi = 0; bi < b; bi++)
        for (int hh = 0; hh < h; hh++) {
            float *s = w->scores;
            const Scratch scratch = {w->bp, w->ap}, *bp = &scratch;
            const long row0 = (long)bi * t;
            const int g = hh / (h / hk);
            if (hh % (h / hk) == 0) transpose(t, hd, k + row0 * kvd + g * hd, kvd, w->kt); /* once a group */
            causal_ab(t, hd, q + row0 * d + hh * hd, d, w->kt, s, bp, m->bf16);
            for (int i = 0; i < t; i++) {
                float *si = s + (long)i * t;
                const float mx = row_max(si, i + 1) * scale, sum = row_exp(si, i + 1, scale, mx);
                row_scale(si, i + 1, 1.0f / sum);
                for (int j = i + 1; j < imin(t, (i / CB + 1) * CB); j++) si[j] = 0.0f; /* read by the block */
                lse_out[(row0 + i) * h + hh] = mx + logf(sum);
            }
            causal_sb(t, hd, s, v + row0 * kvd + g * hd, kvd, out + row0 * d + hh * hd, d, bp, m->bf16);
        }
}

/* from d(out) (w->datt): w->dq (=), w->dk and w->dv (+=, zeroed here) */
static void attention_back(const Net *m, int b, int t, const Work *w, int l) {
    const int h = m->n_heads, hk = m->n_kv_heads, hd = m->head_dim, d = m->dim, kvd = hk * hd;
    const long n = (long)b * t;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *q = w->q + l * n * d, *k = w->k + l * n * kvd, *v = w->v + l * n * kvd, *y = w->att + l * n * d;
    const float *lse = w->lse + l * n * h;
    memset(w->dk, 0, sizeof(float) * n * kvd);
    memset(w->dv, 0, sizeof(float) * n * kvd);
    for (int bi = 0; bi < b; bi++) {
        float *p = w->scores, *ds = p + (long)t * t;
        const Scratch scratch = {w->bp, w->ap}, *bp = &scratch;
        const long row0 = (long)bi * t;
        for (int hh = 0; hh < h; hh++) {
            const int g = hh / (h / hk);
            const float *qh = q + row0 * d + hh * hd, *kh = k + row0 * kvd + g * hd, *vh = v + row0 * kvd + g * hd;
            const float *dy = w->datt + row0 * d + hh * hd, *yh = y + row0 * d + hh * hd;
            if (hh % (h / hk) == 0) {
                transpose(t, hd, kh, kvd, w->kt);
                transpose(t, hd, vh, kvd, w->kt + (long)hd * t);
            }
            causal_ab(t, hd, qh, d, w->kt, p, bp, m->bf16);
            causal_ab(t, hd, dy, d, w->kt + (long)hd * t, ds, bp, m->bf16); /* dP = dY V^T */
            for (int i = 0; i < t; i++) {
                float *pi = p + (long)i * t, *di = ds + (long)i * t;
                const float li = lse[(row0 + i) * h + hh];
                float dd = 0.0f;
#pragma omp simd reduction(+ : dd)
                for (int e = 0; e < hd; e++) dd += dy[(long)i * d + e] * yh[(long)i * d + e];
                row_softmax_back(pi, di, i + 1, scale, li, dd);
                for (int j = i + 1; j < imin(t, (i / CB + 1) * CB); j++) pi[j] = di[j] = 0.0f; /* read by the block */
            }
            causal_sb(t, hd, ds, kh, kvd, w->dq + row0 * d + hh * hd, d, bp, m->bf16);     /* dQ = dS K */
            causal_stb(t, hd, ds, qh, d, w->dk + row0 * kvd + g * hd, kvd, bp, m->bf16);   /* dK += dS^T Q */
            causal_stb(t, hd, p, dy, d, w->dv + row0 * kvd + g * hd, kvd, bp, m->bf16);    /* dV += P^T dY */
        }
    }
}

/* the head, the loss and (with grads) their gradients, block by block: returns the summed loss; dhf =
   d(loss)/d(hf) times scale, and the head's gradient +=. ph: the head's weights packed (bf16 products), for the
   logits' product and dhf's. */
static double head_loss(const Net *m, int n, const int64_t *targets, const Work *w, float scale, const Packed *ph,
                        int grads) {
    const int d = m->dim, vcb = m->vocab, rows = ce_rows(m);
    double total = 0.0;
    float *z = w->scores;
    const Scratch scratch = {w->bp, w->ap}, *bp = &scratch;
    for (int i0 = 0; i0 < n; i0 += rows) {
        const int r = imin(rows, n - i0);
        gemm_with(r, vcb, d, w->hf + (long)i0 * d, d, 0, m->head, d, 1, z, vcb, 0, bp, m->bf16, ph->fwd);
        double part = 0.0;
        for (int i = 0; i < r; i++) {
            float *zi = z + (long)i * vcb;
            const int64_t ti = targets[i0 + i];
            const float mx = row_max(zi, vcb), zt = zi[ti] - mx, sum = row_exp(zi, vcb, 1.0f, mx);
            part += logf(sum) - zt;
            if (!grads) continue;
            row_scale(zi, vcb, scale / sum);
            zi[ti] -= scale;
        }
        total += part;
        if (!grads) continue;
        gemm_with(r, d, vcb, z, vcb, 0, m->head, d, 0, w->dh + (long)i0 * d, d, 0, bp, m->bf16, ph->back);
        gemm(vcb, d, r, z, vcb, 1, w->hf + (long)i0 * d, d, 0, m->g_head, d, 1, bp, m->bf16);
    }
    return total;
}

/* weight `which` of layer l as packed in pk (lay_out_packs'; the head is pk[0]), or unpacked */
static inline const Packed *packed(const Packed *pk, int l, int which) {
    return pk ? &pk[1 + P_LAYER * l + which] : &unpacked;
}

/* b sequences of t tokens, on one thread: the summed loss; with grads, gradients, times dscale per token, added. pk:
   the weights packed (bf16 products), or 0 */
static double forward_backward(const Net *m, const int64_t *tokens, const int64_t *targets, int b, int t, float *work,
                               float dscale, const Packed *pk, int grads) {
    const int d = m->dim, f = m->d_ff, h = m->n_heads, hk = m->n_kv_heads, hd = m->head_dim, kvd = hk * hd;
    const long n = (long)b * t;
    Work w;
    carve(m, n, work, &w);
    const Scratch scratch = {w.bp, w.ap}, *bp = &scratch;
    float *x = w.xin; /* the residual stream: layer l's input is xin[l], its middle xmid[l] */
    for (long i = 0; i < n; i++) memcpy(x + i * d, m->embed + tokens[i] * d, sizeof(float) * d);
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *ly = &m->layers[l];
        float *xin = w.xin + l * n * d, *h1 = w.h1 + l * n * d, *q = w.q + l * n * d, *k = w.k + l * n * kvd;
        float *v = w.v + l * n * kvd, *att = w.att + l * n * d, *xmid = w.xmid + l * n * d, *h2 = w.h2 + l * n * d;
        float *a = w.a + l * n * f, *u = w.u + l * n * f;
        rmsnorm((int)n, d, xin, ly->attn_norm, m->eps, h1, w.rstd1 + l * n);
        linear((int)n, d, d, h1, ly->wq, packed(pk, l, P_WQ), q, 0, bp, m->bf16);
        linear((int)n, kvd, d, h1, ly->wk, packed(pk, l, P_WK), k, 0, bp, m->bf16);
        linear((int)n, kvd, d, h1, ly->wv, packed(pk, l, P_WV), v, 0, bp, m->bf16);
        rope((int)n, t, h, hd, q, m->rope_cos, m->rope_sin, 0);
        rope((int)n, t, hk, hd, k, m->rope_cos, m->rope_sin, 0);
        attention(m, b, t, &w, l, att, w.lse + l * n * h);
        memcpy(xmid, xin, sizeof(float) * n * d);
        linear((int)n, d, d, att, ly->wo, packed(pk, l, P_WO), xmid, 1, bp, m->bf16);
        rmsnorm((int)n, d, xmid, ly->mlp_norm, m->eps, h2, w.rstd2 + l * n);
        linear((int)n, f, d, h2, ly->w_gate, packed(pk, l, P_GATE), a, 0, bp, m->bf16);
        linear((int)n, f, d, h2, ly->w_up, packed(pk, l, P_UP), u, 0, bp, m->bf16);
#pragma omp simd
        for (long i = 0; i < n * f; i++) w.s[i] = a[i] * sigmoid(a[i]) * u[i];
        float *next = l + 1 < m->n_layers ? w.xin + (l + 1) * n * d : w.xf;
        memcpy(next, xmid, sizeof(float) * n * d);
        linear((int)n, d, f, w.s, ly->w_down, packed(pk, l, P_DOWN), next, 1, bp, m->bf16);
    }
    rmsnorm((int)n, d, w.xf, m->norm, m->eps, w.hf, w.rstdf);
    const double loss = head_loss(m, (int)n, targets, &w, dscale, pk ? pk : &unpacked, grads);
    if (!grads) return loss;
    memset(w.dx, 0, sizeof(float) * n * d);
    rmsnorm_back((int)n, d, w.xf, m->norm, w.rstdf, w.dh, w.dx, m->g_norm);
    for (int l = m->n_layers - 1; l >= 0; l--) {
        const Layer *ly = &m->layers[l];
        float *xin = w.xin + l * n * d, *h1 = w.h1 + l * n * d, *att = w.att + l * n * d;
        float *xmid = w.xmid + l * n * d, *h2 = w.h2 + l * n * d, *a = w.a + l * n * f, *u = w.u + l * n * f;
#pragma omp simd
        for (long i = 0; i < n * f; i++) {
            const float sg = sigmoid(a[i]);
            w.du[i] = sg; /* kept for da and du below */
            w.s[i] = a[i] * sg * u[i];
        }
        gemm(d, f, (int)n, w.dx, d, 1, w.s, f, 0, ly->g_down, f, 1, bp, m->bf16); /* g_down += dx^T s */
        /* ds = dx W_down, into s */
        gemm_with((int)n, f, d, w.dx, d, 0, ly->w_down, f, 0, w.s, f, 0, bp, m->bf16, packed(pk, l, P_DOWN)->back);
#pragma omp simd
        for (long i = 0; i < n * f; i++) {
            const float sg = w.du[i], silu = a[i] * sg;
            w.da[i] = w.s[i] * u[i] * sg * (1.0f + a[i] * (1.0f - sg));
            w.du[i] = w.s[i] * silu;
        }
        linear_back((int)n, f, d, h2, ly->w_gate, packed(pk, l, P_GATE), w.da, w.dh, 0, ly->g_gate, bp, m->bf16);
        linear_back((int)n, f, d, h2, ly->w_up, packed(pk, l, P_UP), w.du, w.dh, 1, ly->g_up, bp, m->bf16);
        rmsnorm_back((int)n, d, xmid, ly->mlp_norm, w.rstd2 + l * n, w.dh, w.dx, ly->g_mlp_norm);
        linear_back((int)n, d, d, att, ly->wo, packed(pk, l, P_WO), w.dx, w.datt, 0, ly->g_wo, bp, m->bf16);
        attention_back(m, b, t, &w, l);
        rope((int)n, t, h, hd, w.dq, m->rope_cos, m->rope_sin, 1);
        rope((int)n, t, hk, hd, w.dk, m->rope_cos, m->rope_sin, 1);
        linear_back((int)n, d, d, h1, ly->wq, packed(pk, l, P_WQ), w.dq, w.dh, 0, ly->g_wq, bp, m->bf16);
        linear_back((int)n, kvd, d, h1, ly->wk, packed(pk, l, P_WK), w.dk, w.dh, 1, ly->g_wk, bp, m->bf16);
        linear_back((int)n, kvd, d, h1, ly->wv, packed(pk, l, P_WV), w.dv, w.dh, 1, ly->g_wv, bp, m->bf16);
        rmsnorm_back((int)n, d, xin, ly->attn_norm, w.rstd1 + l * n, w.dh, w.dx, ly->g_attn_norm);
    }
    for (long i = 0; i < n; i++) {
        float *ge = m->g_embed + tokens[i] * d;
        const float *di = w.dx + i * d;
#pragma omp simd
        for (int j = 0; j < d; j++) ge[j] += di[j];
    }
    return loss;
}

/* b sequences on one thread, forward and backward `per` at a time: their summed loss */
static double run_passes(const Net *m, const int64_t *tokens, const int64_t *targets, int b, int t, float *work,
                         float dscale, const Packed *pk, int per, int grads) {
    double total = 0.0;
    for (int b0 = 0; b0 < b; b0 += per)
        total += forward_backward(m, tokens + (long)b0 * t, targets + (long)b0 * t, imin(per, b - b0), t, work,
                                  dscale, pk, grads);
    return total;
}

/* A micro-step's passes over b x t tokens: the mean loss (nats/token), and with grads its gradients, times
   grad_scale, added to the gradient buffers. NaN for a token outside the vocabulary or t past the context. Threads
   split the batch by sequences, each with its own workspace and gradients (the models this step is for are too small
   for one product to feed two cores), summed into the caller's at the end. */
static double micro_step(const Net *m, const int64_t *tokens, const int64_t *targets, int b, int t, float *work,
                         float grad_scale, int grads) {
    const long n = (long)b * t;
    if (t > m->seq_len || t < 1 || b < 1) return NAN;
    for (long i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->vocab || targets[i] < 0 || targets[i] >= m->vocab) return NAN;
    const float dscale = grad_scale / (float)n;
    const int th = step_threads(b);
    Packed packs[MAX_WEIGHTS(m)]; /* the weights in bf16 pairs, at the workspace's start (packed by the threads) */
    const long shared = lay_out_packs(m, (uint32_t *)work, packs);
    const Packed *pk = shared ? packs : 0;
    work += shared;
    const int per = pass_seqs(m, (b + th - 1) / th);
    if (th == 1) {
        if (pk) pack_weights(m, pk, grads, 0, 1);
        return run_passes(m, tokens, targets, b, t, work, dscale, pk, per, grads) / (double)n;
    }
    const long rows = (long)per * t, share = share_floats(m, rows, th), act = carve(m, rows, 0, 0);
    Layer caller_layers[m->n_layers];
    Net caller = *m;
    memcpy(caller_layers, m->layers, sizeof(Layer) * m->n_layers);
    float **mine[MAX_SLOTS(m)];
    long size[MAX_SLOTS(m)];
    const int count = grads ? grad_slots(&caller, caller_layers, mine, size) : 0;
    double total = 0.0;
#pragma omp parallel num_threads(th) reduction(+ : total)
    {
        /* the team may be smaller than asked for (OMP_THREAD_LIMIT, OMP_DYNAMIC): a thread then takes several
           chunks, each in its own share of the workspace */
        const int id = thread_id(), team = team_size();
        if (pk) {
            pack_weights(m, pk, grads, id, team);
#pragma omp barrier
        }
        for (int c = id; c < th; c += team) {
            const int b0 = (int)((long)b * c / th), b1 = (int)((long)b * (c + 1) / th);
            float *base = work + c * share, *at = base + act;
            Layer layers[m->n_layers];
            Net own = *m;
            memcpy(layers, m->layers, sizeof(Layer) * m->n_layers);
            own.layers = layers;
            if (grads) {
                float **slot[MAX_SLOTS(m)];
                long floats[MAX_SLOTS(m)];
                const int n_slots = grad_slots(&own, layers, slot, floats);
                memset(at, 0, sizeof(float) * grad_floats(m));
                for (int k = 0; k < n_slots; k++) *slot[k] = at, at += floats[k];
                if (m->g_head == m->g_embed) own.g_head = own.g_embed;
            }
            total += run_passes(&own, tokens + (long)b0 * t, targets + (long)b0 * t, b1 - b0, t, base, dscale, pk,
                                per, grads);
        }
#pragma omp barrier
        /* each thread sums a slice of every buffer over the chunks' copies (laid out in grad_slots' order) */
        long offset = act;
        for (int c = 0; c < count; c++) {
            const long lo = size[c] * id / team, hi = size[c] * (id + 1) / team;
            float *dst = *mine[c];
            for (int chunk = 0; chunk < th; chunk++) {
                const float *src = work + chunk * share + offset;
#pragma omp simd
                for (long i = lo; i < hi; i++) dst[i] += src[i];
            }
            offset += size[c];
        }
    }
    return total / (double)n;
}

/* One micro-step: tokens and targets are b x t; returns the mean loss (nats/token) and adds its gradients, times
   grad_scale, to the gradient buffers (NaN: see micro_step) */
double fw_train_step(const Net *m, const int64_t *tokens, const int64_t *targets, int b, int t, float *work,
                     float grad_scale) {
    return micro_step(m, tokens, targets, b, t, work, grad_scale, 1);
}

/* The mean loss (nats/token) of b x t tokens, forward only: no gradient is written (the evaluation's) */
double fw_loss(const Net *m, const int64_t *tokens, const int64_t *targets, int b, int t, float *work) {
    return micro_step(m, tokens, targets, b, t, work, 0.0f, 0);
}

/* ---- the optimizer: gradient clipping, AdamW and Muon in one call ----

   The same updates as torch.optim.AdamW (fused), flopwise's BatchedMuon (torch.optim.Muon's) and
   torch.nn.utils.clip_grad_norm_, reading and writing their state tensors in place, so a checkpoint reads either
   way. At the sizes a sweep trains, those ran as a few hundred small tensor operations a step: 3-4 ms of a 9 ms step
   at d_model 16. */

typedef struct {
    int muon;                /* 0: AdamW; 1: Muon */
    int nesterov, ns_steps;  /* Muon */
    int lr_ratio;            /* Muon's learning-rate adjustment: 1 sqrt(max(1, rows / cols)), 2 0.2 sqrt(max) */
    double lr, weight_decay; /* this step's */
    double beta1, beta2, eps;                     /* AdamW */
    double momentum, ns_a, ns_b, ns_c, ns_eps;    /* Muon */
} Group;

typedef struct {
    float *param, *grad;
    float *avg;    /* AdamW's exp_avg; Muon's momentum_buffer */
    float *avg_sq; /* AdamW's exp_avg_sq */
    float *step;   /* AdamW's step count (a float tensor), incremented here */
    long rows, cols;
    int group;
} Tensor;

static inline float to_bf16(float x) {
    union {
        uint32_t u;
        float f;
    } v = {.u = bf16_bits(x) << 16};
    return v.f;
}

/* a b + c as torch's vector kernels compute it here: fused where the CPU has FMA (else fmaf is a library call, and
   torch's kernels multiply and add) */
#if defined(__FMA__) || defined(__aarch64__)
#define FMA(a, b, c) fmaf(a, b, c)
#else
#define FMA(a, b, c) ((a) * (b) + (c))
#endif

/* torch's lerp: start + w (end - start), from the end for w >= 1/2 */
static inline float lerp(float start, float end, float w) {
    return w < 0.5f ? FMA(w, end - start, start) : FMA(-(end - start), 1.0f - w, end);
}

/* a function whose products and sums round as written: GCC otherwise fuses a * b + c into one rounding, across
   statements too. Clang fuses only within one expression, where the code below names no such pair. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

/* AdamW as torch.optim.AdamW(fused=True)'s step (the trainer's), each operation ordered and rounded as its kernel
   does it: p *= 1 - lr wd; m = lerp(m, g, 1 - beta1); v = fma(g (1 - beta2), g, v beta2);
   p += ((-lr / c1) m) / (sqrt(v) / sqrt(c2) + eps). After 20 steps at d_model 128 every parameter and moment
   equals torch's to the bit (the compiler's own fusing had left 73% of the parameters equal); a tensor's last
   partial vector (torch's scalar remainder) can differ by an ulp. The compiler vectorises the loop (with errno
   off); each fused multiply-add is named, none is left to it. */
NO_CONTRACT static void adamw(const Tensor *t, const Group *g) {
    const float step = *t->step += 1.0f;
    const double c1 = 1.0 - pow(g->beta1, step), c2_sqrt = sqrt(1.0 - pow(g->beta2, step));
    const float decay = (float)(1.0 - g->lr * g->weight_decay), b2 = (float)g->beta2;
    const float w1 = (float)(1.0 - g->beta1), w2 = (float)(1.0 - g->beta2), eps = (float)g->eps;
    const float step_size = (float)(-g->lr / c1), c2s = (float)c2_sqrt;
    const long n = t->rows * t->cols;
    float *p = t->param, *m = t->avg, *v = t->avg_sq, *gr = t->grad;
#pragma omp simd
    for (long i = 0; i < n; i++) {
        const float x = gr[i], pi = p[i] * decay;
        gr[i] = 0.0f;
        m[i] = lerp(m[i], x, w1);
        v[i] = FMA(w2 * x, x, v[i] * b2);
        p[i] = pi + step_size * m[i] / (sqrtf(v[i]) / c2s + eps);
    }
}

/* floats of one Muon matrix's workspace (rows <= cols after transposing): the update, its iterate and the next
   (r x c each), three r x r, and the products' packing scratch */
static long muon_floats(long rows, long cols) {
    const long r = rows < cols ? rows : cols, c = rows < cols ? cols : rows;
    const long panels = (long)(KC / 2) * round_up((int)c, 32);
    return 3 * round_up((int)(r * c), 16) + 3 * round_up((int)(r * r), 16) + (panels > KC * 32 ? panels : KC * 32) +
           (long)round_up((int)r, 16) * (KC / 2);
}

/* C (m x m) = op(A) op(B) where that is symmetric (x x^T, or a symmetric matrix squared), bf16 as gemm's: each
   32-column panel is multiplied from its first column's row down, the rest mirrored. An element is the same sum in
   the same order as gemm's (so the result is gemm's to the bit), for 5/8 of the work at m = 128. */
static void gemm_symmetric(int m, int k, const float *a, long lda, const float *b, long ldb, int tb, float *c, long ldc,
                           const Scratch *sc) {
    for (int j0 = 0; j0 < m; j0 += 32)
        gemm(m - j0, imin(32, m - j0), k, a + (long)j0 * lda, lda, 0, tb ? b + (long)j0 * ldb : b + j0, ldb, tb,
             c + (long)j0 * ldc + j0, ldc, 0, sc, 1);
    for (int i0 = 0; i0 < m; i0 += 32) /* the 32 x 32 blocks above the panels' diagonal blocks, each from its mirror */
        for (int j0 = i0 + 32; j0 < m; j0 += 32)
            for (int i = i0; i < i0 + 32; i++)
                for (int j = j0; j < imin(j0 + 32, m); j++) c[(long)i * ldc + j] = c[(long)j * ldc + i];
}

/* Newton-Schulz's quintic iteration on x (r x c, r <= c), in bf16 as torch's Muon does it: each product's operands
   are bf16, its sum fp32, its result rounded to bf16 */
static float *newton_schulz(int r, int c, float *x, float *y, float *gram, float *poly, float *tmp, const Group *g,
                            const Scratch *sc) {
    double sq = 0.0; /* in lanes: one chain of dependent adds cost 4 cycles an element (bf16 hides the order) */
#pragma omp simd reduction(+ : sq)
    for (long i = 0; i < (long)r * c; i++) {
        x[i] = to_bf16(x[i]);
        sq += (double)x[i] * x[i];
    }
    float norm = to_bf16((float)sqrt(sq));
    const float floor_ = to_bf16((float)g->ns_eps);
    norm = norm < floor_ ? floor_ : norm;
    for (long i = 0; i < (long)r * c; i++) x[i] = to_bf16(x[i] / norm);
    const float a = (float)g->ns_a, b = (float)g->ns_b, cc = (float)g->ns_c;
    for (int it = 0; it < g->ns_steps; it++) {
        gemm_symmetric(r, c, x, c, x, c, 1, gram, r, sc); /* x x^T */
        for (long i = 0; i < (long)r * r; i++) gram[i] = to_bf16(gram[i]);
        gemm_symmetric(r, r, gram, r, gram, r, 0, tmp, r, sc); /* gram^2 */
        for (long i = 0; i < (long)r * r; i++) poly[i] = to_bf16(b * gram[i] + cc * tmp[i]);
        gemm(r, c, r, poly, r, 0, x, c, 0, y, c, 0, sc, 1);
        for (long i = 0; i < (long)r * c; i++) y[i] = to_bf16(a * x[i] + y[i]);
        float *swap = x;
        x = y, y = swap;
    }
    return x;
}

static void muon(const Tensor *t, const Group *g, float *work) {
    const long rows = t->rows, cols = t->cols, n = rows * cols;
    const int tall = rows > cols;
    const int r = (int)(tall ? cols : rows), c = (int)(tall ? rows : cols);
    float *upd = work, *x = upd + round_up((int)n, 16), *y = x + round_up((int)n, 16);
    float *gram = y + round_up((int)n, 16), *poly = gram + round_up(r * r, 16), *tmp = poly + round_up(r * r, 16);
    const long panels = (long)(KC / 2) * round_up(c, 32);
    float *packed = tmp + round_up(r * r, 16);
    const Scratch scratch = {packed, (uint32_t *)(packed + (panels > KC * 32 ? panels : KC * 32))};
    const float w = (float)(1.0 - g->momentum), mom = (float)g->momentum;
    float *buf = t->avg, *gr = t->grad;
#pragma omp simd
    for (long i = 0; i < n; i++) {
        buf[i] = lerp(buf[i], gr[i], w);
        upd[i] = g->nesterov ? lerp(gr[i], buf[i], mom) : buf[i];
        gr[i] = 0.0f;
    }
    if (tall) /* orthogonalised as its transpose: rows <= columns */
        for (long i = 0; i < rows; i++)
            for (long j = 0; j < cols; j++) x[j * rows + i] = upd[i * cols + j];
    else
        memcpy(x, upd, sizeof(float) * n);
    const float *o = newton_schulz(r, c, x, y, gram, poly, tmp, g, &scratch);
    const double big = rows > cols ? rows : cols;
    const double ratio = g->lr_ratio == 2 ? 0.2 * sqrt(big) : sqrt(fmax(1.0, (double)rows / cols));
    const float decay = (float)(1.0 - g->lr * g->weight_decay), step = (float)-(g->lr * ratio);
    float *p = t->param;
    for (long i = 0; i < n; i++) p[i] *= decay; /* rounded on its own, as torch's two operations round */
    for (long i = 0; i < rows; i++)
        for (long j = 0; j < cols; j++) p[i * cols + j] += step * (tall ? o[j * rows + i] : o[i * cols + j]);
}

/* floats of workspace fw_update needs with this process' threads */
long fw_update_floats(const Tensor *t, int count, const Group *groups) {
    long most = 0;
    for (int i = 0; i < count; i++)
        if (groups[t[i].group].muon && muon_floats(t[i].rows, t[i].cols) > most)
            most = muon_floats(t[i].rows, t[i].cols);
    return (long)n_threads() * round_up((int)most, 16);
}

/* One optimizer step over count tensors: with clip > 0 their gradients are first scaled to a total norm of at most
   clip (as torch.nn.utils.clip_grad_norm_ does); returns the total norm before clipping. The gradients are zeroed
   once used, ready for the next step's micro-batches to add to. Muon's matrices are shared among threads. */
double fw_update(const Tensor *t, int count, const Group *groups, float clip, float *work) {
    float sq = 0.0f; /* in fp32 as torch's: each tensor's norm, then the norm of the norms */
    for (int i = 0; i < count; i++) {
        const float *gr = t[i].grad;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (long j = 0; j < t[i].rows * t[i].cols; j++) s += gr[j] * gr[j];
        const float norm = sqrtf((float)s);
        sq += norm * norm;
    }
    const float norm = sqrtf(sq);
    if (clip > 0.0f) {
        const float coef = clip / (norm + 1e-6f);
        if (!(coef >= 1.0f)) /* a NaN norm makes every gradient NaN, as torch's does */
            for (int i = 0; i < count; i++) {
                float *gr = t[i].grad;
#pragma omp simd
                for (long j = 0; j < t[i].rows * t[i].cols; j++) gr[j] *= coef;
            }
    }
    for (int i = 0; i < count; i++)
        if (!groups[t[i].group].muon) adamw(&t[i], &groups[t[i].group]);
    const long share = fw_update_floats(t, count, groups) / n_threads();
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < count; i++)
        if (groups[t[i].group].muon) muon(&t[i], &groups[t[i].group], work + thread_id() * share);
    return norm;
}

/* what this build is: 1 OpenMP, 2 bf16 products, 4 AVX-512 tiles */
int fw_build(void) {
    int bits = HAVE_BF16 ? 2 : 0;
#ifdef _OPENMP
    bits |= 1;
#endif
#ifdef __AVX512F__
    bits |= 4;
#endif
    return bits;
}
