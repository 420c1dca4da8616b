/* puyu's CPU linear for 4-bit group-quantised weights: y[b, n] = sum_k x[b, k] * (q[k, n] * s[g, n] + m[g, n])
 * (+ bias[n]), g = k / group_size; m = -zero * scale (TurboMind's W = (q - z) * s, rearranged so that the
 * dequantisation is one FMA).
 *
 * Why it exists: a decode step streams every weight once; at 4 bits (plus 2 x 16 bits of scale and offset per
 * group) that is about a quarter of the bf16 traffic, and the weights are dequantised in registers, never
 * written back. torch's int4 CPU kernel takes bf16 activations only, which CPUs without bf16 arithmetic compute
 * slowly around it.
 *
 * Layout (made once at load by cpu_kernels.PackedInt4Linear), N padded to a multiple of 16:
 * - q: int32 [N/16][K][2]: for each k, the panel's 16 nibbles, outputs 0..7 in word 0 and 8..15 in word 1,
 *   output j of a word in bits [4j, 4j + 4) (low nibble first, as TurboMind's qweight rows);
 * - sz: float16 [N/16][K/group_size][2][16]: the group's 16 scales, then its 16 zero points, as stored (m is
 *   computed from them in float32, once per group).
 * x and y are [B, K] and [B, N] float32 or bf16 (x_bf16), contiguous; bias (optional) has x's dtype.
 * Micro-kernel (up to Q_MR rows: AVX2 4 rows x 16 outputs in 8 ymm, AVX-512 8 rows in 8 zmm): per k it unpacks
 * 16 nibbles (broadcast, variable shift, mask, convert), dequantises them with one FMA each against the group's
 * scale and offset held in registers, and broadcasts one x value per row. Needs AVX2, FMA and F16C.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define Q_NR 16

static inline float q_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t q_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__)
/* AVX-512: the panel's 16 nibbles unpack into one zmm (one permute, shift, mask, convert); 8 rows in registers. */
#define Q_MR 8

static inline __m512 unpack16(const int32_t* words, __m512i idx, __m512i shifts, __m512i mask) {
    __m512i v = _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i*)words)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, shifts), mask));
}

static inline __m512 load_h16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

#define Q_CONSTANTS                                                                                            \
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);                    \
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);        \
    const __m512i mask = _mm512_set1_epi32(0xF)

/* The group's scales s and offsets m = -z * s. */
static inline void q_group(const uint16_t* p, __m512* s, __m512* m) {
    *s = load_h16(p);
    *m = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), load_h16(p + Q_NR)), *s);
}

static inline __attribute__((always_inline)) void q_micro(const int32_t* q, const uint16_t* sz, const float* x,
                                                          long K, long group, int mr, float* out) {
    Q_CONSTANTS;
    __m512 acc[Q_MR], odd = _mm512_setzero_ps();  /* odd: the one-row case's second chain (odd k) */
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    for (long g0 = 0; g0 < K; g0 += group) {
        __m512 s, m;
        q_group(sz + (g0 / group) * 2 * Q_NR, &s, &m);
        if (mr == 1 && group % 2 == 0) {  /* batch-1 decode: two FMA chains, so latency never stalls the stream */
            for (long k = g0; k < g0 + group; k += 2) {
                __m512 w0 = _mm512_fmadd_ps(unpack16(q + 2 * k, idx, shifts, mask), s, m);
                __m512 w1 = _mm512_fmadd_ps(unpack16(q + 2 * k + 2, idx, shifts, mask), s, m);
                acc[0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[k]), acc[0]);
                odd = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[k + 1]), odd);
            }
            continue;
        }
        for (long k = g0; k < g0 + group; k++) {
            __m512 w = _mm512_fmadd_ps(unpack16(q + 2 * k, idx, shifts, mask), s, m);
            for (int i = 0; i < mr; i++) acc[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[i * K + k]), acc[i]);
        }
    }
    if (mr == 1) acc[0] = _mm512_add_ps(acc[0], odd);
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(out + i * Q_NR, acc[i]);
}

static void q_dequant_panel(const int32_t* q, const uint16_t* sz, long K, long group, float* buf) {
    Q_CONSTANTS;
    for (long g0 = 0; g0 < K; g0 += group) {
        __m512 s, m;
        q_group(sz + (g0 / group) * 2 * Q_NR, &s, &m);
        for (long k = g0; k < g0 + group; k++)
            _mm512_storeu_ps(buf + k * Q_NR, _mm512_fmadd_ps(unpack16(q + 2 * k, idx, shifts, mask), s, m));
    }
}

#else /* AVX2 + FMA + F16C */
#define Q_MR 4

static inline __m256 unpack8(int32_t word, __m256i shifts, __m256i mask) {
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
}

static inline __m256 load_h8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

static inline __attribute__((always_inline)) void q_micro(const int32_t* q, const uint16_t* sz, const float* x,
                                                          long K, long group, int mr, float* out) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0xF);
    __m256 acc[Q_MR][2];
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (long g0 = 0; g0 < K; g0 += group) {
        const uint16_t* p = sz + (g0 / group) * 2 * Q_NR;
        __m256 s0 = load_h8(p), s1 = load_h8(p + 8);
        __m256 m0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), load_h8(p + 16)), s0);  /* m = -z * s */
        __m256 m1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), load_h8(p + 24)), s1);
        for (long k = g0; k < g0 + group; k++) {
            __m256 w0 = _mm256_fmadd_ps(unpack8(q[2 * k], shifts, mask), s0, m0);
            __m256 w1 = _mm256_fmadd_ps(unpack8(q[2 * k + 1], shifts, mask), s1, m1);
            for (int i = 0; i < mr; i++) {
                __m256 xv = _mm256_broadcast_ss(x + i * K + k);
                acc[i][0] = _mm256_fmadd_ps(w0, xv, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, xv, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(out + i * Q_NR, acc[i][0]);
        _mm256_storeu_ps(out + i * Q_NR + 8, acc[i][1]);
    }
}

static void q_dequant_panel(const int32_t* q, const uint16_t* sz, long K, long group, float* buf) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0xF);
    for (long g0 = 0; g0 < K; g0 += group) {
        const uint16_t* p = sz + (g0 / group) * 2 * Q_NR;
        __m256 s0 = load_h8(p), s1 = load_h8(p + 8);
        __m256 m0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), load_h8(p + 16)), s0);
        __m256 m1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), load_h8(p + 24)), s1);
        for (long k = g0; k < g0 + group; k++) {
            _mm256_storeu_ps(buf + k * Q_NR, _mm256_fmadd_ps(unpack8(q[2 * k], shifts, mask), s0, m0));
            _mm256_storeu_ps(buf + k * Q_NR + 8, _mm256_fmadd_ps(unpack8(q[2 * k + 1], shifts, mask), s1, m1));
        }
    }
}

#endif

/* Defined in cpu_linear.c: one float32 panel against all B rows. */
void puyu_panel_rows_f32w(const float* panel, const float* x, long B, long K, long N, long n0, const void* bias,
                          int y_bf16, void* y);

/* Rows [b, b + mr) of y for the panel's outputs from the micro-kernel's out. */
static void q_write_rows(void* y, int y_bf16, const void* bias, const float* out, long b, int mr, long n0, long N) {
    long cols = N - n0 < Q_NR ? N - n0 : Q_NR;
    for (int i = 0; i < mr; i++)
        for (long j = 0; j < cols; j++) {
            long n = n0 + j;
            float v = out[i * Q_NR + j];
            if (bias) v += y_bf16 ? q_bf16_to_f32(((const uint16_t*)bias)[n]) : ((const float*)bias)[n];
            if (y_bf16) ((uint16_t*)y)[(b + i) * N + n] = q_f32_to_bf16(v);
            else ((float*)y)[(b + i) * N + n] = v;
        }
}

/* Returns 0, or -1 when a buffer cannot be allocated. Up to Q_MR rows, each panel is dequantised in registers in
 * one pass; for more rows (prefill) a panel is dequantised once into a per-thread float32 buffer (K x 16, in L2)
 * and multiplied by cpu_linear.c's float32 kernel, rather than dequantised again for every Q_MR rows. */
int puyu_linear_int4(const void* x, int x_bf16, const int32_t* q, const uint16_t* sz, long group, const void* bias,
                     void* y, long B, long K, long N, int threads) {
    if (B <= 0) return 0;
    const float* xf = (const float*)x;
    float* widened = NULL;
    if (x_bf16) {
        widened = (float*)malloc(sizeof(float) * B * K);
        if (!widened) return -1;
        for (long i = 0; i < B * K; i++) widened[i] = q_bf16_to_f32(((const uint16_t*)x)[i]);
        xf = widened;
    }
    long num_panels = (N + Q_NR - 1) / Q_NR;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float* buf = B > Q_MR ? (float*)malloc(sizeof(float) * K * Q_NR) : NULL;
        if (B > Q_MR && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long p = 0; p < num_panels; p++) {
            const int32_t* qp = q + p * K * 2;
            const uint16_t* smp = sz + p * (K / group) * 2 * Q_NR;
            if (B > Q_MR) {
                if (!buf) continue;
                q_dequant_panel(qp, smp, K, group, buf);
                puyu_panel_rows_f32w(buf, xf, B, K, N, p * Q_NR, bias, x_bf16, y);
                continue;
            }
            float out[Q_MR * Q_NR];
            switch (B) {
                case 1: q_micro(qp, smp, xf, K, group, 1, out); break;
                case 2: q_micro(qp, smp, xf, K, group, 2, out); break;
                case 3: q_micro(qp, smp, xf, K, group, 3, out); break;
#if Q_MR == 8
                case 4: q_micro(qp, smp, xf, K, group, 4, out); break;
                case 5: q_micro(qp, smp, xf, K, group, 5, out); break;
                case 6: q_micro(qp, smp, xf, K, group, 6, out); break;
                case 7: q_micro(qp, smp, xf, K, group, 7, out); break;
#endif
                default: q_micro(qp, smp, xf, K, group, Q_MR, out); break;
            }
            q_write_rows(y, x_bf16, bias, out, 0, (int)B, p * Q_NR, N);
        }
        free(buf);
    }
    free(widened);
    return failed ? -1 : 0;
}
