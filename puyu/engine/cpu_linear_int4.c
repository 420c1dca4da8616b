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
 * Micro-kernel: up to 4 batch rows x 16 outputs in 8 accumulators; per k it unpacks 16 nibbles (broadcast,
 * variable shift, mask, convert), dequantises them with one FMA each against the group's scale and offset held
 * in registers, and broadcasts one x value per row. Needs AVX2, FMA and F16C.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define Q_NR 16
#define Q_MR 4

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

/* Returns 0, or -1 when the float32 copy of a bf16 x cannot be allocated. */
int puyu_linear_int4(const void* x, int x_bf16, const int32_t* q, const uint16_t* sz, long group, const void* bias,
                     void* y, long B, long K, long N, int threads) {
    const float* xf = (const float*)x;
    float* widened = NULL;
    if (x_bf16) {
        widened = (float*)malloc(sizeof(float) * B * K);
        if (!widened) return -1;
        for (long i = 0; i < B * K; i++) widened[i] = q_bf16_to_f32(((const uint16_t*)x)[i]);
        xf = widened;
    }
    long num_panels = (N + Q_NR - 1) / Q_NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long p = 0; p < num_panels; p++) {
        const int32_t* qp = q + p * K * 2;
        const uint16_t* smp = sz + p * (K / group) * 2 * Q_NR;
        float out[Q_MR * Q_NR];
        for (long b = 0; b < B; b += Q_MR) {
            int mr = B - b < Q_MR ? (int)(B - b) : Q_MR;
            const float* xb = xf + b * K;
            switch (mr) {
                case 1: q_micro(qp, smp, xb, K, group, 1, out); break;
                case 2: q_micro(qp, smp, xb, K, group, 2, out); break;
                case 3: q_micro(qp, smp, xb, K, group, 3, out); break;
                default: q_micro(qp, smp, xb, K, group, 4, out); break;
            }
            long cols = N - p * Q_NR < Q_NR ? N - p * Q_NR : Q_NR;
            for (int i = 0; i < mr; i++)
                for (long j = 0; j < cols; j++) {
                    long n = p * Q_NR + j;
                    float v = out[i * Q_NR + j];
                    if (bias) v += x_bf16 ? q_bf16_to_f32(((const uint16_t*)bias)[n]) : ((const float*)bias)[n];
                    if (x_bf16) ((uint16_t*)y)[(b + i) * N + n] = q_f32_to_bf16(v);
                    else ((float*)y)[(b + i) * N + n] = v;
                }
        }
    }
    free(widened);
    return 0;
}
