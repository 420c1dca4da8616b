/* puyu's CPU linear for bf16 (and float32) weights: y[b, n] = sum_k x[b, k] * w[n, k] (+ bias[n]).
 *
 * Why it exists: at decode batch sizes a linear is a matrix-vector product bound by how fast the weights stream
 * from memory. Two bytes per weight (bf16) halve that traffic against float32, but on CPUs without bf16 arithmetic
 * (AVX2 parts, e.g. AMD Zen 3) torch's bf16 matmul is many times slower than its float32 one, and on every CPU
 * its per-call cost is high for these small shapes. Here each weight is widened to float32 in registers (a bf16 is
 * the top half of a float32) and multiplied with FMA; accumulation is float32, as in torch.
 *
 * Layout: w is bf16 (puyu_linear_bf16w) or float32 (puyu_linear_f32w) [N, K] (one row per output, torch's nn.Linear layout), row-major and contiguous; x and y are
 * [B, K] and [B, N], both float32 or both bf16 (x_bf16), contiguous; bias (optional) has x's dtype.
 * Work split: threads (OpenMP, the same runtime torch uses) take tiles of 4 output rows; inside a tile the 4
 * weight rows stay in L1 while every batch row passes over them, so each weight leaves memory once per call.
 * Built with -march=native by puyu/engine/cpu_linear.py; needs AVX2 and FMA.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 load_bf16x8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f32x8(const float* p) { return _mm256_loadu_ps(p); }
static inline float f32_id(float f) { return f; }

/* TILE_4x2(name, W, LOAD8, LOAD1): out[r * 2 + j] = dot(w row r, x row j) for 4 weight rows of element type W and
 * 2 batch rows (x1 may equal x0); DOT_ROW(name, ...): one row against one x row (the N % 4 tail). */
#define TILE_4x2(name, W, LOAD8, LOAD1)                                                                        \
    static void name(const W* w, long K, const float* x0, const float* x1, float out[8]) {                     \
        const W *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;                                        \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;        \
        long k = 0;                                                                                            \
        for (; k + 8 <= K; k += 8) {                                                                           \
            __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);                                 \
            __m256 v0 = LOAD8(w0 + k), v1 = LOAD8(w1 + k), v2 = LOAD8(w2 + k), v3 = LOAD8(w3 + k);             \
            a0 = _mm256_fmadd_ps(v0, xa, a0); a1 = _mm256_fmadd_ps(v1, xa, a1);                               \
            a2 = _mm256_fmadd_ps(v2, xa, a2); a3 = _mm256_fmadd_ps(v3, xa, a3);                                \
            b0 = _mm256_fmadd_ps(v0, xb, b0); b1 = _mm256_fmadd_ps(v1, xb, b1);                                \
            b2 = _mm256_fmadd_ps(v2, xb, b2); b3 = _mm256_fmadd_ps(v3, xb, b3);                                \
        }                                                                                                      \
        float s[8] = {hsum(a0), hsum(b0), hsum(a1), hsum(b1), hsum(a2), hsum(b2), hsum(a3), hsum(b3)};         \
        for (; k < K; k++) {                                                                                   \
            for (int r = 0; r < 4; r++) {                                                                      \
                float wv = LOAD1(w[r * K + k]);                                                                \
                s[r * 2] += wv * x0[k];                                                                        \
                s[r * 2 + 1] += wv * x1[k];                                                                    \
            }                                                                                                  \
        }                                                                                                      \
        memcpy(out, s, sizeof s);                                                                              \
    }

#define DOT_ROW(name, W, LOAD8, LOAD1)                                                                         \
    static float name(const W* w, const float* x, long K) {                                                    \
        __m256 a = _mm256_setzero_ps();                                                                        \
        long k = 0;                                                                                            \
        for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(LOAD8(w + k), _mm256_loadu_ps(x + k), a);             \
        float s = hsum(a);                                                                                     \
        for (; k < K; k++) s += LOAD1(w[k]) * x[k];                                                            \
        return s;                                                                                              \
    }

TILE_4x2(tile_bf16w, uint16_t, load_bf16x8, bf16_to_f32)
TILE_4x2(tile_f32w, float, load_f32x8, f32_id)
DOT_ROW(dot_bf16w, uint16_t, load_bf16x8, bf16_to_f32)
DOT_ROW(dot_f32w, float, load_f32x8, f32_id)

static inline void store(void* y, int y_bf16, long i, float v) {
    if (y_bf16) ((uint16_t*)y)[i] = f32_to_bf16(v);
    else ((float*)y)[i] = v;
}

static inline float load(const void* p, int is_bf16, long i) {
    return is_bf16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

/* LINEAR(name, W, TILE, DOT): the entry point for weights of element type W. Returns 0, or -1 when the float32
 * copy of a bf16 x cannot be allocated. */
#define LINEAR(name, W, TILE, DOT)                                                                             \
    int name(const void* x, int x_bf16, const W* w, const void* bias, void* y, long B, long K, long N) {       \
        const float* xf = (const float*)x;                                                                     \
        float* widened = NULL;                                                                                 \
        if (x_bf16) { /* widen x once: every tile reads it */                                                  \
            widened = (float*)malloc(sizeof(float) * B * K);                                                   \
            if (!widened) return -1;                                                                           \
            const uint16_t* xh = (const uint16_t*)x;                                                           \
            for (long i = 0; i < B * K; i++) widened[i] = bf16_to_f32(xh[i]);                                  \
            xf = widened;                                                                                      \
        }                                                                                                      \
        long tiles = N / 4;                                                                                    \
        _Pragma("omp parallel for schedule(static)")                                                           \
        for (long t = 0; t < tiles; t++) {                                                                     \
            long n = t * 4;                                                                                    \
            for (long b = 0; b < B; b += 2) {                                                                  \
                long b1 = b + 1 < B ? b + 1 : b;                                                               \
                float out[8];                                                                                  \
                TILE(w + n * K, K, xf + b * K, xf + b1 * K, out);                                              \
                for (int r = 0; r < 4; r++) {                                                                  \
                    float add = bias ? load(bias, x_bf16, n + r) : 0.0f;                                       \
                    store(y, x_bf16, b * N + n + r, out[r * 2] + add);                                         \
                    if (b1 != b) store(y, x_bf16, b1 * N + n + r, out[r * 2 + 1] + add);                       \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (long n = tiles * 4; n < N; n++) { /* the last N % 4 rows */                                       \
            for (long b = 0; b < B; b++) {                                                                     \
                float add = bias ? load(bias, x_bf16, n) : 0.0f;                                               \
                store(y, x_bf16, b * N + n, DOT(w + n * K, xf + b * K, K) + add);                              \
            }                                                                                                  \
        }                                                                                                      \
        free(widened);                                                                                         \
        return 0;                                                                                              \
    }

LINEAR(puyu_linear_bf16w, uint16_t, tile_bf16w, dot_bf16w)
LINEAR(puyu_linear_f32w, float, tile_f32w, dot_f32w)
