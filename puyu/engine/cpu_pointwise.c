/* puyu's fused CPU steps between a layer's matmuls: residual add + RMSNorm, and rotary + KV-cache write.
 *
 * Why it exists: at decode batch sizes each of these is a handful of tiny torch ops (RMSNorm alone is seven:
 * float, pow, mean, add, rsqrt, mul, cast) whose fixed cost per call, times 30 layers, was as large as the
 * matmuls' own time. One call each here; the arithmetic follows the torch reference step by step, including
 * where it rounds to bf16, so both paths agree to float32 rounding.
 *
 * Tensors are contiguous, float32 or bf16 (bf16 != 0) alike; the float32 cos/sin tables are [T, D/2].
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

static inline float pw_load(const void* p, int bf16, long i) {
    if (!bf16) return ((const float*)p)[i];
    uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float pw_round(float f, int bf16) { /* f rounded to the storage dtype (nearest even) */
    if (!bf16) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static inline void pw_store(void* p, int bf16, long i, float v) {
    if (!bf16) {
        ((float*)p)[i] = v;
        return;
    }
    uint32_t u; /* v is already rounded to bf16 by the caller: its low half is zero */
    memcpy(&u, &v, 4);
    ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
}

#if defined(__AVX512BF16__)
/* bf16 rows, 16 elements a vector. Why: rounding every product to bf16 in scalar code made these kernels 3-6x
 * slower in bf16 than in float32 (64 rows of SmolLM2: 56 vs 20 us for add_rmsnorm, 100 vs 16 us for rope_write).
 * vcvtneps2bf16 rounds to nearest even like pw_round, so the results are the scalar path's bit for bit (NaN
 * payloads aside). */
static inline __m512 v_load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m256i v_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
static inline __m512 v_round(__m512 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v_bf16(x)), 16));
}
static inline void v_store16(uint16_t* p, __m512 rounded) { _mm256_storeu_si256((__m256i*)p, v_bf16(rounded)); }

static void add_rmsnorm_row_bf16(uint16_t* h, const uint16_t* delta, const uint16_t* weight, uint16_t* out, long H,
                                 float eps) {
    __m512d ss_lo = _mm512_setzero_pd(), ss_hi = _mm512_setzero_pd();
    for (long j = 0; j < H; j += 16) {
        __m512 v = v_load16(h + j);
        if (delta) {
            v = v_round(_mm512_add_ps(v, v_load16(delta + j)));
            v_store16(h + j, v);
        }
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
        ss_lo = _mm512_fmadd_pd(lo, lo, ss_lo);
        ss_hi = _mm512_fmadd_pd(hi, hi, ss_hi);
    }
    double ss = _mm512_reduce_add_pd(_mm512_add_pd(ss_lo, ss_hi));
    __m512 r = _mm512_set1_ps(1.0f / sqrtf((float)(ss / H) + eps));
    for (long j = 0; j < H; j += 16) {
        __m512 n = v_round(_mm512_mul_ps(v_load16(h + j), r));
        v_store16(out + j, v_round(_mm512_mul_ps(v_load16(weight + j), n)));
    }
}

/* one head of D values (interleaved pairs a, b) rotated: (a c - b s, b c + a s), every product and sum rounded */
static void rope_head_bf16(const uint16_t* src, const float* ct, const float* st, uint16_t* dst, long D) {
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512 sign = _mm512_set_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    for (long j = 0; j < D; j += 16) { /* 8 pairs */
        __m512 x = v_load16(src + j);
        __m512 c = _mm512_permutexvar_ps(dup, v_round(_mm512_castps256_ps512(_mm256_loadu_ps(ct + j / 2))));
        __m512 s = _mm512_permutexvar_ps(dup, v_round(_mm512_castps256_ps512(_mm256_loadu_ps(st + j / 2))));
        __m512 xc = v_round(_mm512_mul_ps(x, c));                               /* a c, b c */
        __m512 ys = v_round(_mm512_mul_ps(_mm512_permute_ps(x, 0xB1), s));     /* b s, a s */
        v_store16(dst + j, v_round(_mm512_add_ps(xc, _mm512_mul_ps(sign, ys))));
    }
}
#endif

/* h[T, H] += delta (when delta is not NULL, rounded to the dtype like torch's add); then
 * out = weight * round(h * rsqrt(mean(h^2) + eps)), the product rounded to the dtype. */
void puyu_add_rmsnorm(void* h, const void* delta, const void* weight, void* out, long T, long H, float eps,
                      int bf16) {
#if defined(__AVX512BF16__)
    if (bf16 && H % 16 == 0) {
#pragma omp parallel for schedule(static) if (T > 4)
        for (long t = 0; t < T; t++)
            add_rmsnorm_row_bf16((uint16_t*)h + t * H, delta ? (const uint16_t*)delta + t * H : NULL,
                                 (const uint16_t*)weight, (uint16_t*)out + t * H, H, eps);
        return;
    }
#endif
#pragma omp parallel for schedule(static) if (T > 4)
    for (long t = 0; t < T; t++) {
        double ss = 0.0;
        for (long j = 0; j < H; j++) {
            float v = pw_load(h, bf16, t * H + j);
            if (delta) {
                v = pw_round(v + pw_load(delta, bf16, t * H + j), bf16);
                pw_store(h, bf16, t * H + j, v);
            }
            ss += (double)v * v;
        }
        float r = 1.0f / sqrtf((float)(ss / H) + eps);
        for (long j = 0; j < H; j++) {
            float n = pw_round(pw_load(h, bf16, t * H + j) * r, bf16);
            pw_store(out, bf16, t * H + j, pw_round(pw_load(weight, bf16, j) * n, bf16));
        }
    }
}

/* qkv [T, (Hq + 2 Hkv) * D]: rotate the q and k heads pairwise, (a, b) -> (a c - b s, b c + a s) with c, s
 * rounded to the dtype and every product and sum rounded like torch's; q goes to q_out [T, Hq, D]; k and v go
 * to slot slots[t] of one layer's cache [num_slots, Hkv, D]. */
void puyu_rope_write(const void* qkv, const float* cos, const float* sin, const int64_t* slots, void* q_out,
                     void* k_cache, void* v_cache, long T, long Hq, long Hkv, long D, int bf16) {
    const long half = D / 2, width = (Hq + 2 * Hkv) * D;
#pragma omp parallel for schedule(static) if (T > 4)
    for (long t = 0; t < T; t++) {
        const float* ct = cos + t * half;
        const float* st = sin + t * half;
        for (long h = 0; h < Hq + Hkv; h++) {
            void* dst = h < Hq ? q_out : k_cache;
            long dst_base = h < Hq ? (t * Hq + h) * D : (slots[t] * Hkv + (h - Hq)) * D;
            long src = t * width + h * D;
#if defined(__AVX512BF16__)
            if (bf16 && D % 16 == 0) {
                rope_head_bf16((const uint16_t*)qkv + src, ct, st, (uint16_t*)dst + dst_base, D);
                continue;
            }
#endif
            for (long j = 0; j < half; j++) {
                float a = pw_load(qkv, bf16, src + 2 * j), b = pw_load(qkv, bf16, src + 2 * j + 1);
                float c = pw_round(ct[j], bf16), s = pw_round(st[j], bf16);
                float ac = pw_round(a * c, bf16), bs = pw_round(b * s, bf16);
                float bc = pw_round(b * c, bf16), as = pw_round(a * s, bf16);
                pw_store(dst, bf16, dst_base + 2 * j, pw_round(ac - bs, bf16));
                pw_store(dst, bf16, dst_base + 2 * j + 1, pw_round(bc + as, bf16));
            }
        }
        long vsrc = t * width + (Hq + Hkv) * D, vdst = slots[t] * Hkv * D;
        size_t esize = bf16 ? 2 : 4;
        memcpy((char*)v_cache + vdst * esize, (const char*)qkv + vsrc * esize, (size_t)(Hkv * D) * esize);
    }
}
