/* puyu's CPU linear for bf16 (and float32) weights: y[b, n] = sum_k x[b, k] * w[n, k] (+ bias[n]).
 *
 * Why it exists: at decode batch sizes a linear is a matrix-vector product bound by how fast the weights stream
 * from memory. Two bytes per weight (bf16) halve that traffic against float32, but on CPUs without bf16 arithmetic
 * (AVX2 parts, e.g. AMD Zen 3) torch's bf16 matmul is many times slower than its float32 one, and on every CPU
 * its per-call cost is high for these small shapes. Here each weight is widened to float32 in registers (a bf16 is
 * the top half of a float32) and multiplied with FMA; accumulation is float32, as in torch.
 *
 * Weight layout ("panels", made once at load by cpu_kernels.pack_weight): the [N, K] matrix, N padded with zero
 * rows to a multiple of 16, stored as [N/16][K][16]: for each k, the 16 weights of a panel's outputs side by
 * side. x and y are [B, K] and [B, N], both float32 or both bf16 (x_bf16), contiguous; bias (optional) has x's
 * dtype.
 * Micro-kernel: up to 6 batch rows x 16 outputs held in 12 ymm accumulators; per k it loads (and widens) the
 * panel's 16 weights once and broadcasts one x value per row: 12 FMAs per 2 weight loads, no horizontal sums. A
 * panel (16 * K weights) stays in L1/L2 while every group of 6 rows passes over it, so each weight leaves memory
 * once per call. Threads (OpenMP, the runtime torch uses) take whole panels; their number is passed in (torch's
 * setting for the calling thread: an OpenMP default read in a thread other than the main one can be 1).
 * Built with -march=native by puyu/engine/cpu_kernels.py; needs AVX2 and FMA.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16 /* outputs per panel */
#define MR 6  /* batch rows per micro-kernel call */

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

static inline __m256 load_f32x8(const float* p) { return _mm256_loadu_ps(p); }

/* MICRO(name, W, LOAD8): acc[i][0..16) = sum_k x[i][k] * panel[k][0..16) for i < mr (mr <= MR, a constant after
 * inlining), written to out[i * NR + j]. */
#define MICRO(name, W, LOAD8)                                                                                  \
    static inline __attribute__((always_inline)) void name(const W* panel, const float* x, long K, int mr,    \
                                                           float* out) {                                       \
        __m256 acc[MR][2];                                                                                     \
        for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();                              \
        for (long k = 0; k < K; k++) {                                                                         \
            __m256 w0 = LOAD8(panel + k * NR), w1 = LOAD8(panel + k * NR + 8);                                 \
            for (int i = 0; i < mr; i++) {                                                                     \
                __m256 xv = _mm256_broadcast_ss(x + i * K + k);                                                \
                acc[i][0] = _mm256_fmadd_ps(w0, xv, acc[i][0]);                                                \
                acc[i][1] = _mm256_fmadd_ps(w1, xv, acc[i][1]);                                                \
            }                                                                                                  \
        }                                                                                                      \
        for (int i = 0; i < mr; i++) {                                                                         \
            _mm256_storeu_ps(out + i * NR, acc[i][0]);                                                         \
            _mm256_storeu_ps(out + i * NR + 8, acc[i][1]);                                                     \
        }                                                                                                      \
    }

/* MICRO1(name, W, LOAD8): the one-row case (batch-1 decode), bound by memory: two k per iteration into separate
 * accumulators, so the FMA latency chain never throttles the weight stream. */
#define MICRO1(name, W, LOAD8)                                                                                 \
    static inline __attribute__((always_inline)) void name(const W* panel, const float* x, long K, float* out) { \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;                                            \
        long k = 0;                                                                                            \
        for (; k + 2 <= K; k += 2) {                                                                           \
            __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);                      \
            a0 = _mm256_fmadd_ps(LOAD8(panel + k * NR), x0, a0);                                               \
            a1 = _mm256_fmadd_ps(LOAD8(panel + k * NR + 8), x0, a1);                                           \
            b0 = _mm256_fmadd_ps(LOAD8(panel + (k + 1) * NR), x1, b0);                                         \
            b1 = _mm256_fmadd_ps(LOAD8(panel + (k + 1) * NR + 8), x1, b1);                                     \
        }                                                                                                      \
        if (k < K) {                                                                                           \
            __m256 x0 = _mm256_broadcast_ss(x + k);                                                            \
            a0 = _mm256_fmadd_ps(LOAD8(panel + k * NR), x0, a0);                                               \
            a1 = _mm256_fmadd_ps(LOAD8(panel + k * NR + 8), x0, a1);                                           \
        }                                                                                                      \
        _mm256_storeu_ps(out, _mm256_add_ps(a0, b0));                                                          \
        _mm256_storeu_ps(out + 8, _mm256_add_ps(a1, b1));                                                      \
    }

MICRO1(micro1_bf16w, uint16_t, load_bf16x8)
MICRO1(micro1_f32w, float, load_f32x8)
MICRO(micro_bf16w, uint16_t, load_bf16x8)
MICRO(micro_f32w, float, load_f32x8)

static inline void store(void* y, int y_bf16, long i, float v) {
    if (y_bf16) ((uint16_t*)y)[i] = f32_to_bf16(v);
    else ((float*)y)[i] = v;
}

static inline float load(const void* p, int is_bf16, long i) {
    return is_bf16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

/* Rows [b, b + mr) of y for outputs [n, n + NR) (clipped at N), from the micro-kernel's out. */
static void write_rows(void* y, int y_bf16, const void* bias, const float* out, long b, int mr, long n, long N) {
    long cols = N - n < NR ? N - n : NR;
    for (int i = 0; i < mr; i++)
        for (long j = 0; j < cols; j++)
            store(y, y_bf16, (b + i) * N + n + j, out[i * NR + j] + (bias ? load(bias, y_bf16, n + j) : 0.0f));
}

/* LINEAR(name, W, MICRO): the entry point for panels of element type W. Returns 0, or -1 when the float32 copy
 * of a bf16 x cannot be allocated. The switch gives the micro-kernel a constant row count (registers, not a
 * stack array). */
#define LINEAR(name, W, MICRO, MICRO1)                                                                               \
    int name(const void* x, int x_bf16, const W* panels, const void* bias, void* y, long B, long K, long N,    \
             int threads) {                                                                                    \
        const float* xf = (const float*)x;                                                                     \
        float* widened = NULL;                                                                                 \
        if (x_bf16) { /* widen x once: every panel reads it */                                                 \
            widened = (float*)malloc(sizeof(float) * B * K);                                                   \
            if (!widened) return -1;                                                                           \
            const uint16_t* xh = (const uint16_t*)x;                                                           \
            for (long i = 0; i < B * K; i++) widened[i] = bf16_to_f32(xh[i]);                                  \
            xf = widened;                                                                                      \
        }                                                                                                      \
        long num_panels = (N + NR - 1) / NR;                                                                   \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                      \
        for (long p = 0; p < num_panels; p++) {                                                                \
            const W* panel = panels + p * K * NR;                                                              \
            float out[MR * NR];                                                                                \
            for (long b = 0; b < B; b += MR) {                                                                 \
                int mr = B - b < MR ? (int)(B - b) : MR;                                                       \
                const float* xb = xf + b * K;                                                                  \
                switch (mr) {                                                                                  \
                    case 1: MICRO1(panel, xb, K, out); break;                                                  \
                    case 2: MICRO(panel, xb, K, 2, out); break;                                                \
                    case 3: MICRO(panel, xb, K, 3, out); break;                                                \
                    case 4: MICRO(panel, xb, K, 4, out); break;                                                \
                    case 5: MICRO(panel, xb, K, 5, out); break;                                                \
                    default: MICRO(panel, xb, K, 6, out); break;                                               \
                }                                                                                              \
                write_rows(y, x_bf16, bias, out, b, mr, p * NR, N);                                            \
            }                                                                                                  \
        }                                                                                                      \
        free(widened);                                                                                         \
        return 0;                                                                                              \
    }

LINEAR(puyu_linear_bf16w, uint16_t, micro_bf16w, micro1_bf16w)
LINEAR(puyu_linear_f32w, float, micro_f32w, micro1_f32w)
