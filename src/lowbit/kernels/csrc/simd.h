// The vector operations the kernels are written in, for one instruction set at a time.
//
// isa.cpp is compiled three times (-DLB_ISA=2 with AVX-512 F/BW/VL/DQ, 1 with AVX2+FMA+F16C, 0 with the
// baseline x86-64 flags); each copy sees exactly one `struct V` from this header. A kernel written
// against V (W float lanes, W int32 lanes) is therefore the same arithmetic on every path: only the
// number of lanes, and so the order in which partial sums are added, differs.
//
// Everything here is static inline (internal linkage): nothing compiled with AVX-512 flags can be
// picked by the linker for the baseline path.
#pragma once
#include <stdint.h>
#include <string.h>

#if LB_ISA >= 1
#include <immintrin.h>
#endif

namespace {

// IEEE half -> float, exact (used for ggml's fp16 fields; F16C does the same in one instruction).
static inline float half_to_float(uint16_t h) {
#if LB_ISA >= 1
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal half: normalise
        int e = -1;
        do { ++e; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// Round a float to the nearest bfloat16 (ties to even), returned as a float: what torch's .to(bfloat16)
// does for finite values.
static inline float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&x, &u, 4);
    return x;
}

#if LB_ISA == 2
struct V {
    static constexpr int W = 16;
    typedef __m512 F;
    typedef __m512i I;
    typedef __m512 Lut;  // 16 floats indexed by the low 4 bits of an int32 lane

    static inline F zero() { return _mm512_setzero_ps(); }
    static inline F set1(float a) { return _mm512_set1_ps(a); }
    static inline F load(const float* p) { return _mm512_loadu_ps(p); }
    static inline void store(float* p, F a) { _mm512_storeu_ps(p, a); }
    static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
    static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static inline float sum(F a) { return _mm512_reduce_add_ps(a); }
    static inline Lut lut(const float* t) { return _mm512_loadu_ps(t); }
    static inline F lookup(I idx, Lut t) { return _mm512_permutexvar_ps(idx, t); }
    static inline I loadi(const void* p) { return _mm512_loadu_si512(p); }
    static inline I srl4(I a) { return _mm512_srli_epi32(a, 4); }
    static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
    static inline I bytes_s(const void* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
    static inline I bytes_u(const void* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
    static inline I seti(int a) { return _mm512_set1_epi32(a); }
    static inline I iota(int first) { return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(first)); }
    static inline I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
    static inline I sll(I a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
    static inline I srlv(I a, I n) { return _mm512_srlv_epi32(a, n); }
    static inline I and_(I a, I b) { return _mm512_and_si512(a, b); }
    static inline I or_(I a, I b) { return _mm512_or_si512(a, b); }
    static inline I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
    // W/4 pieces of 16 bytes, piece j from p + j*stride: the lanes of four consecutive 32-weight blocks.
    static inline I pieces16(const uint8_t* p, int64_t stride) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)p));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + stride)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + 2 * stride)), 2);
        return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + 3 * stride)), 3);
    }
    // Lane i = v[i / (W / n)]: n values (n = 1, 2, 4, 8 or 16) spread over equal runs of lanes.
    static inline F spread(const float* v, int n) {
        if (n == 1) return _mm512_set1_ps(v[0]);
        if (n == 16) return _mm512_loadu_ps(v);
        __m512i idx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        n == 2 ? 3 : n == 4 ? 2 : 1);
        return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), v));
    }
    // Lane i = the fp16 value at p + (i / 4) * STRIDE + OFF (four 32-weight blocks, one value each),
    // gathered from one 64-byte load by a word permute: no scalar stores on the way.
    template <int STRIDE, int OFF>
    static inline F halves4(const uint8_t* p) {
        static_assert(3 * STRIDE + OFF + 2 <= 64, "four blocks' fields must lie in 64 bytes");
        const __m512i idx = _mm512_set_epi16(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            (3 * STRIDE + OFF) / 2, (3 * STRIDE + OFF) / 2, (3 * STRIDE + OFF) / 2, (3 * STRIDE + OFF) / 2,
            (2 * STRIDE + OFF) / 2, (2 * STRIDE + OFF) / 2, (2 * STRIDE + OFF) / 2, (2 * STRIDE + OFF) / 2,
            (STRIDE + OFF) / 2, (STRIDE + OFF) / 2, (STRIDE + OFF) / 2, (STRIDE + OFF) / 2,
            OFF / 2, OFF / 2, OFF / 2, OFF / 2);
        __m512i h = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(p));
        return _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    }
    static inline F pair(float a, float b) {  // lanes 0..7 = a, 8..15 = b
        return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
    }
    // 32 bytes into both 256-bit halves (two lane groups reading the same 8 dwords)
    static inline I twice32(const void* p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p)); }
    // Two 16-entry tables: lanes [0, W/2) look their code up in a, lanes [W/2, W) in b (one vpermt2ps).
    struct Tab2 { F a, b; };
    template <class Fn> static inline Lut map(Lut t, Fn f) { return f(t); }
    static inline Tab2 tab2(Lut a, Lut b) { return Tab2{a, b}; }
    // The codes of a lane's even (odd) nibbles as lookup2 indices, one per byte: byte j holds nibble 2j (2j + 1)
    // in bits 0..3 and the table choice in bit 4, so each following nibble is 8 bits further (srl8).
    static inline I even_idx(I v) {
        const __m512i hi = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x10101010, 0x10101010, 0x10101010, 0x10101010,
                                             0x10101010, 0x10101010, 0x10101010, 0x10101010);
        return _mm512_ternarylogic_epi32(v, _mm512_set1_epi32(0x0F0F0F0F), hi, 0xEA);   // (v & 0x0F..) | hi
    }
    static inline I odd_idx(I v) { return even_idx(_mm512_srli_epi32(v, 4)); }
    static inline I srl8(I a) { return _mm512_srli_epi32(a, 8); }
    static inline F lookup2(I idx, const Tab2& t) { return _mm512_permutex2var_ps(t.a, idx, t.b); }
    static inline F round_bf16(F a) {
        __m512i u = _mm512_castps_si512(a);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
        return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
};
#elif LB_ISA == 1
struct V {
    static constexpr int W = 8;
    typedef __m256 F;
    typedef __m256i I;
    struct Lut { __m256 lo, hi; };

    static inline F zero() { return _mm256_setzero_ps(); }
    static inline F set1(float a) { return _mm256_set1_ps(a); }
    static inline F load(const float* p) { return _mm256_loadu_ps(p); }
    static inline void store(float* p, F a) { _mm256_storeu_ps(p, a); }
    static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
    static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static inline float sum(F a) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static inline Lut lut(const float* t) { return Lut{_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
    static inline F lookup(I idx, Lut t) {  // vpermps reads 3 index bits; bit 3 picks the half
        __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx), hi = _mm256_permutevar8x32_ps(t.hi, idx);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    static inline I loadi(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
    static inline I srl4(I a) { return _mm256_srli_epi32(a, 4); }
    static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
    static inline I bytes_s(const void* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
    static inline I bytes_u(const void* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
    static inline I seti(int a) { return _mm256_set1_epi32(a); }
    static inline I iota(int first) { return _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first)); }
    static inline I srl(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
    static inline I sll(I a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
    static inline I srlv(I a, I n) { return _mm256_srlv_epi32(a, n); }
    static inline I and_(I a, I b) { return _mm256_and_si256(a, b); }
    static inline I or_(I a, I b) { return _mm256_or_si256(a, b); }
    static inline I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
    static inline I pieces16(const uint8_t* p, int64_t stride) {
        return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)p)),
                                       _mm_loadu_si128((const __m128i*)(p + stride)), 1);
    }
    static inline F spread(const float* v, int n) {
        if (n == 1) return _mm256_set1_ps(v[0]);
        if (n == 8) return _mm256_loadu_ps(v);
        __m256i idx = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), n == 2 ? 2 : 1);
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(n == 2 ? _mm_castpd_ps(_mm_load_sd((const double*)v))
                                                                       : _mm_loadu_ps(v)), idx);
    }
    template <int STRIDE, int OFF>
    static inline F halves4(const uint8_t* p) {  // two blocks: lanes 0..3, 4..7
        uint16_t a, b;
        memcpy(&a, p + OFF, 2);
        memcpy(&b, p + STRIDE + OFF, 2);
        return _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(b)), _mm_set1_ps(_cvtsh_ss(a)));
    }
    static inline F pair(float a, float b) { return _mm256_set_m128(_mm_set1_ps(b), _mm_set1_ps(a)); }
    struct Tab2 { Lut a, b; };
    template <class Fn> static inline Lut map(Lut t, Fn f) { return Lut{f(t.lo), f(t.hi)}; }
    static inline Tab2 tab2(Lut a, Lut b) { return Tab2{a, b}; }
    static inline I even_idx(I v) { return v; }   // lookup reads bits 0..3 only
    static inline I odd_idx(I v) { return srl4(v); }
    static inline I srl8(I a) { return _mm256_srli_epi32(a, 8); }
    static inline F lookup2(I idx, const Tab2& t) { return _mm256_blend_ps(lookup(idx, t.a), lookup(idx, t.b), 0xF0); }
    static inline F round_bf16(F a) {
        __m256i u = _mm256_castps_si256(a);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
        return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
};
#else
// Portable lanes: plain arrays the compiler may or may not vectorise. Same lane semantics as above.
struct V {
    static constexpr int W = 8;
    struct F { float v[8]; };
    struct I { uint32_t v[8]; };
    struct Lut { float t[16]; };

    static inline F zero() { F r; for (int i = 0; i < W; ++i) r.v[i] = 0.f; return r; }
    static inline F set1(float a) { F r; for (int i = 0; i < W; ++i) r.v[i] = a; return r; }
    static inline F load(const float* p) { F r; memcpy(r.v, p, sizeof r.v); return r; }
    static inline void store(float* p, F a) { memcpy(p, a.v, sizeof a.v); }
    static inline F add(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
    static inline F sub(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] -= b.v[i]; return a; }
    static inline F mul(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
    static inline F fma(F a, F b, F c) {  // a separate multiply and add: the baseline has no fused one
        for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
        return c;
    }
    static inline float sum(F a) {
        float s = 0.f;
        for (int i = 0; i < W; ++i) s += a.v[i];
        return s;
    }
    static inline Lut lut(const float* t) { Lut l; memcpy(l.t, t, sizeof l.t); return l; }
    static inline F lookup(I idx, const Lut& t) { F r; for (int i = 0; i < W; ++i) r.v[i] = t.t[idx.v[i] & 15]; return r; }
    static inline I loadi(const void* p) { I r; memcpy(r.v, p, sizeof r.v); return r; }
    static inline I srl4(I a) { for (int i = 0; i < W; ++i) a.v[i] >>= 4; return a; }
    static inline F cvt(I a) { F r; for (int i = 0; i < W; ++i) r.v[i] = (float)(int32_t)a.v[i]; return r; }
    static inline I bytes_s(const void* p) {
        I r; const int8_t* b = (const int8_t*)p;
        for (int i = 0; i < W; ++i) r.v[i] = (uint32_t)(int32_t)b[i];
        return r;
    }
    static inline I bytes_u(const void* p) {
        I r; const uint8_t* b = (const uint8_t*)p;
        for (int i = 0; i < W; ++i) r.v[i] = b[i];
        return r;
    }
    static inline I seti(int a) { I r; for (int i = 0; i < W; ++i) r.v[i] = (uint32_t)a; return r; }
    static inline I iota(int first) { I r; for (int i = 0; i < W; ++i) r.v[i] = (uint32_t)(first + i); return r; }
    static inline I srl(I a, int n) { for (int i = 0; i < W; ++i) a.v[i] >>= n; return a; }
    static inline I sll(I a, int n) { for (int i = 0; i < W; ++i) a.v[i] <<= n; return a; }
    static inline I srlv(I a, I n) { for (int i = 0; i < W; ++i) a.v[i] >>= n.v[i]; return a; }
    static inline I and_(I a, I b) { for (int i = 0; i < W; ++i) a.v[i] &= b.v[i]; return a; }
    static inline I or_(I a, I b) { for (int i = 0; i < W; ++i) a.v[i] |= b.v[i]; return a; }
    static inline I subi(I a, I b) { for (int i = 0; i < W; ++i) a.v[i] -= b.v[i]; return a; }
    static inline I pieces16(const uint8_t* p, int64_t stride) {
        I r;
        memcpy(r.v, p, 16);
        memcpy(r.v + 4, p + stride, 16);
        return r;
    }
    static inline F spread(const float* v, int n) { F r; for (int i = 0; i < W; ++i) r.v[i] = v[i / (W / n)]; return r; }
    template <int STRIDE, int OFF>
    static inline F halves4(const uint8_t* p) {
        F r;
        for (int i = 0; i < W; ++i) {
            uint16_t h;
            memcpy(&h, p + (i / 4) * STRIDE + OFF, 2);
            r.v[i] = half_to_float(h);
        }
        return r;
    }
    static inline F pair(float a, float b) { F r; for (int i = 0; i < W; ++i) r.v[i] = i < W / 2 ? a : b; return r; }
    static inline F round_bf16(F a) { for (int i = 0; i < W; ++i) a.v[i] = ::round_bf16(a.v[i]); return a; }
    struct Tab2 { Lut a, b; };
    template <class Fn> static inline Lut map(Lut t, Fn f) {
        F lo = load(t.t), hi = load(t.t + 8);
        lo = f(lo);
        hi = f(hi);
        store(t.t, lo);
        store(t.t + 8, hi);
        return t;
    }
    static inline Tab2 tab2(const Lut& a, const Lut& b) { return Tab2{a, b}; }
    static inline I even_idx(I v) { return v; }
    static inline I odd_idx(I v) { return srl4(v); }
    static inline I srl8(I a) { for (int i = 0; i < W; ++i) a.v[i] >>= 8; return a; }
    static inline F lookup2(I idx, const Tab2& t) {
        F r;
        for (int i = 0; i < W; ++i) r.v[i] = (i < W / 2 ? t.a : t.b).t[idx.v[i] & 15];
        return r;
    }

};
#endif

}  // namespace
