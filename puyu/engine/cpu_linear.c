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
 * Micro-kernel: up to MR batch rows x 16 outputs held in registers (AVX2: 6 rows in 12 ymm; AVX-512: 12 rows in
 * 12 zmm); per k it loads (and widens) the panel's 16 weights once and broadcasts one x value per row, no
 * horizontal sums. A panel (16 * K weights) stays in L1/L2 while every group of MR rows passes over it, so each
 * weight leaves memory
 * once per call. Threads (OpenMP, the runtime torch uses) take whole panels; their number is passed in (torch's
 * setting for the calling thread: an OpenMP default read in a thread other than the main one can be 1).
 * Built with -march=native by puyu/engine/cpu_kernels.py; needs AVX2 and FMA.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16 /* outputs per panel */

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

#if defined(__AVX512F__)
/* AVX-512: a panel's 16 outputs are one zmm, so the micro-kernel holds up to 12 rows (12 accumulators) and a
 * weight is loaded once for 12 rows, not 6. float32 panels have the AVX2 layout; bf16 panels are k-paired (below). */
#define MR 12

static inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }

#define MICRO(name, W, LOAD16)                                                                                 \
    static inline __attribute__((always_inline)) void name(const W* panel, const float* x, long K, int mr,    \
                                                           float* out) {                                       \
        __m512 acc[MR];                                                                                        \
        for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();                                             \
        for (long k = 0; k < K; k++) {                                                                         \
            __m512 w = LOAD16(panel + k * NR);                                                                 \
            for (int i = 0; i < mr; i++) acc[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[i * K + k]), acc[i]);    \
        }                                                                                                      \
        for (int i = 0; i < mr; i++) _mm512_storeu_ps(out + i * NR, acc[i]);                                   \
    }

/* The one-row case (batch-1 decode), bound by memory: four k per iteration into separate accumulators, so the
 * FMA latency chain never throttles the weight stream. */
#define MICRO1(name, W, LOAD16)                                                                                \
    static inline __attribute__((always_inline)) void name(const W* panel, const float* x, long K, float* out) { \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                            \
        long k = 0;                                                                                            \
        for (; k + 4 <= K; k += 4) {                                                                           \
            a0 = _mm512_fmadd_ps(LOAD16(panel + k * NR), _mm512_set1_ps(x[k]), a0);                            \
            a1 = _mm512_fmadd_ps(LOAD16(panel + (k + 1) * NR), _mm512_set1_ps(x[k + 1]), a1);                  \
            a2 = _mm512_fmadd_ps(LOAD16(panel + (k + 2) * NR), _mm512_set1_ps(x[k + 2]), a2);                  \
            a3 = _mm512_fmadd_ps(LOAD16(panel + (k + 3) * NR), _mm512_set1_ps(x[k + 3]), a3);                  \
        }                                                                                                      \
        for (; k < K; k++) a0 = _mm512_fmadd_ps(LOAD16(panel + k * NR), _mm512_set1_ps(x[k]), a0);             \
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));                    \
    }

MICRO1(micro1_f32w, float, load_f32x16)
MICRO(micro_f32w, float, load_f32x16)

/* bf16 weights on AVX-512 are stored k-paired: [N/16][K2/2][16][2] (K2 = K rounded up to even, a zero column
 * pads), so one 64-byte load holds the panel's 16 outputs at k and k + 1. For float32 x the pair widens with two
 * integer ops (even k: shift left 16; odd k: mask the low half); for bf16 x it feeds vdpbf16ps directly. */
#define BF16_PAIRED 1

static inline __m512 pair_even(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }

static inline __m512 pair_odd(__m512i w) {
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
}

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif

/* Every weight line is prefetched PREFETCH_BYTES ahead: with many rows per pass the hardware prefetcher alone
 * falls behind (measured: 12 rows streamed the weights at 23 GB/s against 56 GB/s at one row). Panels are
 * contiguous, so near a panel's end this fetches the next one. 4096 measured best of 512..16384 (Zen 5, SmolLM2
 * weight pass: 12 rows 9.2 -> 5.7 ms, 64 rows 26 -> 21 ms, one row unchanged). */
static inline __m512i load_pair(const uint16_t* panel, long kp) {
    const uint16_t* p = panel + kp * 2 * NR;
    _mm_prefetch((const char*)p + PREFETCH_BYTES, _MM_HINT_T0);
    return _mm512_loadu_si512(p);
}

/* k-paired bf16 weights x float32 rows: even and odd k in separate accumulators (24 of 32 zmm at 12 rows), so
 * each FMA chain advances once per pair. */
static inline __attribute__((always_inline)) void micro_bf16w(const uint16_t* panel, const float* x, long K, int mr,
                                                              float* out) {
    __m512 even[MR], odd[MR];
    for (int i = 0; i < mr; i++) even[i] = odd[i] = _mm512_setzero_ps();
    long kp = 0;
    for (; 2 * kp + 2 <= K; kp++) {
        __m512i w = load_pair(panel, kp);
        __m512 we = pair_even(w), wo = pair_odd(w);
        for (int i = 0; i < mr; i++) {
            even[i] = _mm512_fmadd_ps(we, _mm512_set1_ps(x[i * K + 2 * kp]), even[i]);
            odd[i] = _mm512_fmadd_ps(wo, _mm512_set1_ps(x[i * K + 2 * kp + 1]), odd[i]);
        }
    }
    if (K & 1) {
        __m512 we = pair_even(load_pair(panel, kp));
        for (int i = 0; i < mr; i++) even[i] = _mm512_fmadd_ps(we, _mm512_set1_ps(x[i * K + K - 1]), even[i]);
    }
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(out + i * NR, _mm512_add_ps(even[i], odd[i]));
}

static inline __attribute__((always_inline)) void micro1_bf16w(const uint16_t* panel, const float* x, long K,
                                                               float* out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long kp = 0;
    for (; 2 * kp + 4 <= K; kp += 2) {
        __m512i w0 = load_pair(panel, kp), w1 = load_pair(panel, kp + 1);
        a0 = _mm512_fmadd_ps(pair_even(w0), _mm512_set1_ps(x[2 * kp]), a0);
        a1 = _mm512_fmadd_ps(pair_odd(w0), _mm512_set1_ps(x[2 * kp + 1]), a1);
        a2 = _mm512_fmadd_ps(pair_even(w1), _mm512_set1_ps(x[2 * kp + 2]), a2);
        a3 = _mm512_fmadd_ps(pair_odd(w1), _mm512_set1_ps(x[2 * kp + 3]), a3);
    }
    for (; 2 * kp + 2 <= K; kp++) {
        __m512i w = load_pair(panel, kp);
        a0 = _mm512_fmadd_ps(pair_even(w), _mm512_set1_ps(x[2 * kp]), a0);
        a1 = _mm512_fmadd_ps(pair_odd(w), _mm512_set1_ps(x[2 * kp + 1]), a1);
    }
    if (K & 1) a0 = _mm512_fmadd_ps(pair_even(load_pair(panel, kp)), _mm512_set1_ps(x[K - 1]), a0);
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#if defined(__AVX512BF16__)
/* bf16 x (even K): vdpbf16ps adds w[k] * x[k] + w[k+1] * x[k+1] (exact bf16 products, float32 sums) per output,
 * twice the multiply rate of float32 FMA and no widening of either side: prefill and large batches. */
static inline __m512bh x_pair(const uint16_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

static inline __attribute__((always_inline)) void micro_dp(const uint16_t* panel, const uint16_t* x, long K, int mr,
                                                           float* out) {
    __m512 acc[MR];
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    for (long kp = 0; 2 * kp < K; kp++) {
        __m512bh w = (__m512bh)load_pair(panel, kp);
        for (int i = 0; i < mr; i++) acc[i] = _mm512_dpbf16_ps(acc[i], w, x_pair(x + i * K + 2 * kp));
    }
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(out + i * NR, acc[i]);
}

static inline __attribute__((always_inline)) void micro1_dp(const uint16_t* panel, const uint16_t* x, long K,
                                                            float* out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    long kp = 0;
    for (; 2 * kp + 4 <= K; kp += 2) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)load_pair(panel, kp), x_pair(x + 2 * kp));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)load_pair(panel, kp + 1), x_pair(x + 2 * kp + 2));
    }
    for (; 2 * kp < K; kp++) a0 = _mm512_dpbf16_ps(a0, (__m512bh)load_pair(panel, kp), x_pair(x + 2 * kp));
    _mm512_storeu_ps(out, _mm512_add_ps(a0, a1));
}
#endif

#else /* AVX2 + FMA */
#define MR 6  /* batch rows per micro-kernel call */
#define BF16_PAIRED 0

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

#endif

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

/* ROW_CASES(MICRO): one switch case per row count below MR, so each call gets a constant count. */
#define ROW_CASE(MICRO, n) case n: MICRO(panel, xb, K, n, out); break;
#if MR == 12
#define ROW_CASES(MICRO) ROW_CASE(MICRO, 2) ROW_CASE(MICRO, 3) ROW_CASE(MICRO, 4) ROW_CASE(MICRO, 5)           \
    ROW_CASE(MICRO, 6) ROW_CASE(MICRO, 7) ROW_CASE(MICRO, 8) ROW_CASE(MICRO, 9) ROW_CASE(MICRO, 10)            \
    ROW_CASE(MICRO, 11)
#else
#define ROW_CASES(MICRO) ROW_CASE(MICRO, 2) ROW_CASE(MICRO, 3) ROW_CASE(MICRO, 4) ROW_CASE(MICRO, 5)
#endif

/* PANEL_ROWS(name, W, MICRO, MICRO1): one panel (K x 16 weights of type W) against all B rows of float32 x,
 * written to y's outputs [n0, n0 + 16) (clipped at N). The switch gives the micro-kernel a constant row count
 * (registers, not a stack array). */
#define PANEL_ROWS(name, W, X, MICRO, MICRO1)                                                                  \
    void name(const W* panel, const X* x, long B, long K, long N, long n0, const void* bias, int y_bf16,       \
              void* y) {                                                                                       \
        float out[MR * NR];                                                                                    \
        for (long b = 0; b < B; b += MR) {                                                                     \
            int mr = B - b < MR ? (int)(B - b) : MR;                                                           \
            const X* xb = x + b * K;                                                                           \
            switch (mr) {                                                                                      \
                case 1: MICRO1(panel, xb, K, out); break;                                                      \
                ROW_CASES(MICRO)                                                                               \
                default: MICRO(panel, xb, K, MR, out); break;                                                  \
            }                                                                                                  \
            write_rows(y, y_bf16, bias, out, b, mr, n0, N);                                                    \
        }                                                                                                      \
    }

/* puyu_panel_rows_f32w is also the second half of the quantised kernels for many rows (prefill): they
 * dequantise a panel once into a float32 buffer and pass it here. */
PANEL_ROWS(puyu_panel_rows_f32w, float, float, micro_f32w, micro1_f32w)
static PANEL_ROWS(panel_rows_bf16w, uint16_t, float, micro_bf16w, micro1_bf16w)
#if defined(__AVX512BF16__)
static PANEL_ROWS(panel_rows_dp, uint16_t, uint16_t, micro_dp, micro1_dp)
#endif

/* Whether bf16 panels are k-paired (cpu_kernels.PackedLinear packs them so). */
int puyu_bf16_panels_paired(void) { return BF16_PAIRED; }

/* Whether bf16 x meets bf16 weights in the CPU's bf16 dot product (cpu_kernels.bf16_dot). */
int puyu_bf16_dot(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* LINEAR(name, W, PANEL_FN, STRIDE, DIRECT): the entry point for panels of element type W, STRIDE elements
 * apart. Returns 0, or -1 when the float32 copy of a bf16 x cannot be allocated. DIRECT(x) is the bf16-x path
 * that needs no copy (a statement; empty where there is none). Threads take whole panels. */
#define LINEAR(name, W, PANEL_FN, STRIDE, DIRECT)                                                              \
    int name(const void* x, int x_bf16, const W* panels, const void* bias, void* y, long B, long K, long N,    \
             int threads) {                                                                                    \
        long num_panels = (N + NR - 1) / NR, stride = (STRIDE);                                                \
        DIRECT                                                                                                 \
        const float* xf = (const float*)x;                                                                     \
        float* widened = NULL;                                                                                 \
        if (x_bf16) { /* widen x once: every panel reads it */                                                 \
            widened = (float*)malloc(sizeof(float) * B * K);                                                   \
            if (!widened) return -1;                                                                           \
            const uint16_t* xh = (const uint16_t*)x;                                                           \
            for (long i = 0; i < B * K; i++) widened[i] = bf16_to_f32(xh[i]);                                  \
            xf = widened;                                                                                      \
        }                                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                      \
        for (long p = 0; p < num_panels; p++)                                                                  \
            PANEL_FN(panels + p * stride, xf, B, K, N, p * NR, bias, x_bf16, y);                               \
        free(widened);                                                                                         \
        return 0;                                                                                              \
    }

#if defined(__AVX512BF16__)
#define BF16_DIRECT                                                                                            \
    if (x_bf16 && K % 2 == 0) {                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                      \
        for (long p = 0; p < num_panels; p++)                                                                  \
            panel_rows_dp(panels + p * stride, (const uint16_t*)x, B, K, N, p * NR, bias, 1, y);               \
        return 0;                                                                                              \
    }
#else
#define BF16_DIRECT
#endif

LINEAR(puyu_linear_bf16w, uint16_t, panel_rows_bf16w, (BF16_PAIRED ? K + (K & 1) : K) * NR, BF16_DIRECT)
LINEAR(puyu_linear_f32w, float, puyu_panel_rows_f32w, K * NR, )
