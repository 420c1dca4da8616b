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

/* h[T, H] += delta (when delta is not NULL, rounded to the dtype like torch's add); then
 * out = weight * round(h * rsqrt(mean(h^2) + eps)), the product rounded to the dtype. */
void puyu_add_rmsnorm(void* h, const void* delta, const void* weight, void* out, long T, long H, float eps,
                      int bf16) {
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
