/* puyu's CPU decode attention over the paged KV cache: one query token per sequence, keys read through the block
 * table in place (no gathered, padded copy of every context in every layer).
 *
 * Why it exists: torch's CPU SDPA costs about a millisecond per call for these tiny decode shapes, and feeding it
 * means copying each context out of the cache first; together they were a third of a batch-32 decode step.
 *
 * Layout (one layer): cache k, v [num_blocks, block_size, Hkv, D] (float32 or bf16, both the same); q, out
 * [B, Hq, D] in that dtype; block_table int64 [B, nb]; lens int64 [B] (keys per sequence, >= 1, <= nb *
 * block_size). GQA: query head h reads kv head h / (Hq / Hkv). Softmax in float32 with the max subtracted, like
 * SDPA. Threads take (sequence, query head) pairs (a kv head's keys are read by each of its query heads, from
 * cache after the first); per query head: scores 4 keys at a time (independent FMA
 * chains, one horizontal reduction for the four), a vectorised exp, then the weighted values with the output
 * held in registers. Needs AVX2 and FMA, D % 8 == 0.
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

/* e^x for 8 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error below
 * 2e-7 over the range softmax uses, x <= 0), 2^n built in the exponent bits; x below -87 gives 0. */
static inline __m256 att_exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: r stays exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* s[0..len) = exp(s - max) / sum, in place. */
static void att_softmax(float* s, long len) {
    float m = s[0];
    for (long t = 1; t < len; t++) m = s[t] > m ? s[t] : m;
    __m256 vm = _mm256_set1_ps(m), vsum = _mm256_setzero_ps();
    long t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 e = att_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = att_hsum(vsum);
    for (; t < len; t++) {
        s[t] = expf(s[t] - m);
        sum += s[t];
    }
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (t = 0; t + 8 <= len; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv));
    for (; t < len; t++) s[t] *= 1.0f / sum;
}

/* The 4 sums of a, b, c, d (8 lanes each) in one 128-bit vector. */
static inline __m128 att_hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* scores[t] = scale * dot(qf, k of key t) for t < len; 4 keys at a time (independent FMA chains). */
static void att_scores(const float* qf, const void* k_cache, int bf16, const int64_t* table, long block_size,
                       long token_stride, long head_offset, long D, long len, float scale, float* scores) {
    long t = 0;
    for (; t + 4 <= len; t += 4) {
        long base[4];
        for (int j = 0; j < 4; j++) {
            long pos = t + j;
            base[j] = (table[pos / block_size] * block_size + pos % block_size) * token_stride + head_offset;
        }
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long d = 0; d < D; d += 8) {
            __m256 qv = _mm256_loadu_ps(qf + d);
            a0 = _mm256_fmadd_ps(att_load8(k_cache, base[0] + d, bf16), qv, a0);
            a1 = _mm256_fmadd_ps(att_load8(k_cache, base[1] + d, bf16), qv, a1);
            a2 = _mm256_fmadd_ps(att_load8(k_cache, base[2] + d, bf16), qv, a2);
            a3 = _mm256_fmadd_ps(att_load8(k_cache, base[3] + d, bf16), qv, a3);
        }
        _mm_storeu_ps(scores + t, _mm_mul_ps(att_hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
    }
    for (; t < len; t++) {
        long base = (table[t / block_size] * block_size + t % block_size) * token_stride + head_offset;
        __m256 a = _mm256_setzero_ps();
        for (long d = 0; d < D; d += 8) a = _mm256_fmadd_ps(att_load8(k_cache, base + d, bf16), _mm256_loadu_ps(qf + d), a);
        scores[t] = att_hsum(a) * scale;
    }
}

/* acc[0..D) = sum_t p[t] * v of key t; 64 dims at a time in 8 register accumulators when D % 64 == 0. */
static void att_weighted_values(const float* p, const void* v_cache, int bf16, const int64_t* table,
                                long block_size, long token_stride, long head_offset, long D, long len, float* acc) {
    if (D % 64 == 0) {
        for (long d0 = 0; d0 < D; d0 += 64) {
            __m256 r0 = _mm256_setzero_ps(), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0;
            for (long t = 0; t < len; t++) {
                long base = (table[t / block_size] * block_size + t % block_size) * token_stride + head_offset + d0;
                __m256 w = _mm256_set1_ps(p[t]);
                r0 = _mm256_fmadd_ps(w, att_load8(v_cache, base, bf16), r0);
                r1 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 8, bf16), r1);
                r2 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 16, bf16), r2);
                r3 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 24, bf16), r3);
                r4 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 32, bf16), r4);
                r5 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 40, bf16), r5);
                r6 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 48, bf16), r6);
                r7 = _mm256_fmadd_ps(w, att_load8(v_cache, base + 56, bf16), r7);
            }
            __m256 rs[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
            for (int c = 0; c < 8; c++) _mm256_storeu_ps(acc + d0 + 8 * c, rs[c]);
        }
        return;
    }
    memset(acc, 0, sizeof(float) * D);
    for (long t = 0; t < len; t++) {
        long base = (table[t / block_size] * block_size + t % block_size) * token_stride + head_offset;
        __m256 w = _mm256_set1_ps(p[t]);
        for (long d = 0; d < D; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(w, att_load8(v_cache, base + d, bf16), _mm256_loadu_ps(acc + d)));
    }
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
        /* per thread: one query head (float32), its scores, its output */
        float* scratch = (float*)malloc(sizeof(float) * (D + max_len + D));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long task = 0; task < B * Hq; task++) { /* one query head of one sequence */
            if (!scratch) continue;
            long b = task / Hq, hq = task % Hq, h = hq / G, len = lens[b];
            float *qf = scratch, *scores = scratch + D, *acc = scores + max_len;
            for (long d = 0; d < D; d++) {
                long i = task * D + d;
                qf[d] = bf16 ? att_bf16_to_f32(((const uint16_t*)q)[i]) : ((const float*)q)[i];
            }
            const int64_t* table = block_table + b * nb;
            att_scores(qf, k_cache, bf16, table, block_size, token_stride, h * D, D, len, scale, scores);
            att_softmax(scores, len);
            att_weighted_values(scores, v_cache, bf16, table, block_size, token_stride, h * D, D, len, acc);
            for (long d = 0; d < D; d++) {
                if (bf16) ((uint16_t*)out)[task * D + d] = att_f32_to_bf16(acc[d]);
                else ((float*)out)[task * D + d] = acc[d];
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
