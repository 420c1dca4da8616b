/* puyu's CPU decode attention over the paged KV cache: one query token per sequence, keys read through the block
 * table in place (no gathered, padded copy of every context in every layer).
 *
 * Why it exists: torch's CPU SDPA costs about a millisecond per call for these tiny decode shapes, and feeding it
 * means copying each context out of the cache first; together they were a third of a batch-32 decode step.
 *
 * Layout (one layer): cache k, v [num_blocks, block_size, Hkv, D] (float32 or bf16, both the same); q, out
 * [B, Hq, D] in that dtype; block_table int64 [B, nb]; lens int64 [B] (keys per sequence, >= 1, <= nb *
 * block_size). GQA: query head h reads kv head h / (Hq / Hkv). Softmax in float32 with the max subtracted, like
 * SDPA. Threads take (sequence, kv head) pairs. Needs AVX2 and FMA, D % 8 == 0.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float att_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t att_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 att_load8(const void* base, long i, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)base + i);
}

static inline float att_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Returns 0, or -1 when scratch memory cannot be allocated. */
int puyu_decode_attention(const void* q, const void* k_cache, const void* v_cache, const int64_t* block_table,
                          const int64_t* lens, void* out, int bf16, long B, long nb, long block_size, long Hq,
                          long Hkv, long D, float scale, int threads) {
    const long G = Hq / Hkv, token_stride = Hkv * D;
    long max_len = 0;
    for (long b = 0; b < B; b++) max_len = lens[b] > max_len ? lens[b] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* per thread: the query rows of one kv head (float32), their scores, their output accumulators */
        float* scratch = (float*)malloc(sizeof(float) * (G * D + G * max_len + G * D));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long task = 0; task < B * Hkv; task++) {
            if (!scratch) continue;
            long b = task / Hkv, h = task % Hkv, len = lens[b];
            float *qf = scratch, *scores = scratch + G * D, *acc = scores + G * max_len;
            for (long g = 0; g < G; g++)
                for (long d = 0; d < D; d++) {
                    long i = (b * Hq + h * G + g) * D + d;
                    qf[g * D + d] = bf16 ? att_bf16_to_f32(((const uint16_t*)q)[i]) : ((const float*)q)[i];
                }
            for (long t = 0; t < len; t++) {
                long slot = block_table[b * nb + t / block_size] * block_size + t % block_size;
                long base = slot * token_stride + h * D;
                for (long g = 0; g < G; g++) {
                    __m256 a = _mm256_setzero_ps();
                    for (long d = 0; d < D; d += 8)
                        a = _mm256_fmadd_ps(att_load8(k_cache, base + d, bf16), _mm256_loadu_ps(qf + g * D + d), a);
                    scores[g * max_len + t] = att_hsum(a) * scale;
                }
            }
            for (long g = 0; g < G; g++) {
                float* s = scores + g * max_len;
                float m = s[0], sum = 0.0f;
                for (long t = 1; t < len; t++) m = s[t] > m ? s[t] : m;
                for (long t = 0; t < len; t++) {
                    s[t] = expf(s[t] - m);
                    sum += s[t];
                }
                float inv = 1.0f / sum;
                for (long t = 0; t < len; t++) s[t] *= inv;
            }
            memset(acc, 0, sizeof(float) * G * D);
            for (long t = 0; t < len; t++) {
                long slot = block_table[b * nb + t / block_size] * block_size + t % block_size;
                long base = slot * token_stride + h * D;
                for (long d = 0; d < D; d += 8) {
                    __m256 v = att_load8(v_cache, base + d, bf16);
                    for (long g = 0; g < G; g++) {
                        __m256 o = _mm256_loadu_ps(acc + g * D + d);
                        _mm256_storeu_ps(acc + g * D + d, _mm256_fmadd_ps(_mm256_set1_ps(scores[g * max_len + t]), v, o));
                    }
                }
            }
            for (long g = 0; g < G; g++)
                for (long d = 0; d < D; d++) {
                    long i = (b * Hq + h * G + g) * D + d;
                    if (bf16) ((uint16_t*)out)[i] = att_f32_to_bf16(acc[g * D + d]);
                    else ((float*)out)[i] = acc[g * D + d];
                }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
