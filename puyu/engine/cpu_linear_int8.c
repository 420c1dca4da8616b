/* puyu's CPU linear for int8 block-quantised weights: y[b, n] = sum_k x[b, k] * q[n, k] * d[n, k / 32] (+ bias),
 * the form of a GGUF Q8_0 tensor (SmolLM2's tied embedding / lm head: a fifth of its bytes).
 *
 * Why it exists: kept as float32 that lm head streams 4 bytes per weight every decode step; here it streams one
 * (plus a float16 scale per 32), dequantised in registers.
 *
 * Layout (made once at load by cpu_kernels.PackedInt8Linear), N padded to a multiple of 16:
 * - q: int8 [N/16][K][16]: for each k the panel's 16 weights side by side;
 * - d: float16 [N/16][K/32][16]: the panel's scales per block of 32 inputs.
 * x and y are [B, K] and [B, N], float32 or bf16 (x_bf16); bias (optional) has x's dtype. Needs AVX2, FMA, F16C.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define I8_NR 16
#define I8_MR 4
#define I8_BLOCK 32

static inline float i8_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t i8_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __attribute__((always_inline)) void i8_micro(const int8_t* q, const uint16_t* d, const float* x,
                                                           long K, int mr, float* out) {
    __m256 acc[I8_MR][2];
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (long k0 = 0; k0 < K; k0 += I8_BLOCK) {
        const uint16_t* dp = d + (k0 / I8_BLOCK) * I8_NR;
        __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)dp));
        __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dp + 8)));
        for (long k = k0; k < k0 + I8_BLOCK; k++) {
            __m128i v = _mm_loadu_si128((const __m128i*)(q + k * I8_NR));
            __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d0);
            __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), d1);
            for (int i = 0; i < mr; i++) {
                __m256 xv = _mm256_broadcast_ss(x + i * K + k);
                acc[i][0] = _mm256_fmadd_ps(w0, xv, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, xv, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(out + i * I8_NR, acc[i][0]);
        _mm256_storeu_ps(out + i * I8_NR + 8, acc[i][1]);
    }
}

/* Returns 0, or -1 when the float32 copy of a bf16 x cannot be allocated. K % 32 == 0. */
int puyu_linear_int8(const void* x, int x_bf16, const int8_t* q, const uint16_t* d, const void* bias, void* y,
                     long B, long K, long N, int threads) {
    const float* xf = (const float*)x;
    float* widened = NULL;
    if (x_bf16) {
        widened = (float*)malloc(sizeof(float) * B * K);
        if (!widened) return -1;
        for (long i = 0; i < B * K; i++) widened[i] = i8_bf16_to_f32(((const uint16_t*)x)[i]);
        xf = widened;
    }
    long num_panels = (N + I8_NR - 1) / I8_NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long p = 0; p < num_panels; p++) {
        const int8_t* qp = q + p * K * I8_NR;
        const uint16_t* dp = d + p * (K / I8_BLOCK) * I8_NR;
        float out[I8_MR * I8_NR];
        for (long b = 0; b < B; b += I8_MR) {
            int mr = B - b < I8_MR ? (int)(B - b) : I8_MR;
            const float* xb = xf + b * K;
            switch (mr) {
                case 1: i8_micro(qp, dp, xb, K, 1, out); break;
                case 2: i8_micro(qp, dp, xb, K, 2, out); break;
                case 3: i8_micro(qp, dp, xb, K, 3, out); break;
                default: i8_micro(qp, dp, xb, K, 4, out); break;
            }
            long cols = N - p * I8_NR < I8_NR ? N - p * I8_NR : I8_NR;
            for (int i = 0; i < mr; i++)
                for (long j = 0; j < cols; j++) {
                    long n = p * I8_NR + j;
                    float v = out[i * I8_NR + j];
                    if (bias) v += x_bf16 ? i8_bf16_to_f32(((const uint16_t*)bias)[n]) : ((const float*)bias)[n];
                    if (x_bf16) ((uint16_t*)y)[(b + i) * N + n] = i8_f32_to_bf16(v);
                    else ((float*)y)[(b + i) * N + n] = v;
                }
        }
    }
    free(widened);
    return 0;
}
