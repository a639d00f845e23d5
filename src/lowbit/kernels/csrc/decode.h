// Exact float32 values of stored weights, in the order of operations lowbit's Python dequantisation
// uses (compiled with -ffp-contract=off, so a*b - c is never fused), so that every value equals
// QuantLinear / Linear4bit / GGMLLinear's dequantized_weight() bit for bit:
//   affine:  (lut[code] - zero) * scale          (lowbit.kernels.dequant, weights.bnb4)
//   ggml:    (d * sc) * q - (dmin * m)            (lowbit.weights.ggml.fields.Fields.values)
// These serve the tails of the fused kernels, the weights they do not cover, and the tiles of the
// prefill GEMM.
#pragma once
#include "lowbit_kernels.h"
#include "simd.h"

namespace {

// ---- affine weights: scales, zeros and codes -------------------------------------------------------

static inline uint32_t stream_code(const uint8_t* s, int64_t index, int bits, int64_t nbytes) {
    int64_t bit = index * bits, byte = bit >> 3;
    uint32_t window = s[byte] | (byte + 1 < nbytes ? (uint32_t)s[byte + 1] << 8 : 0u);
    return (window >> (bit & 7)) & ((1u << bits) - 1);
}

static inline float affine_scale(const lb_affine& w, int64_t index) {  // index = r * groups + g
    switch (w.scale_kind) {
        case LB_S_F16: return half_to_float(((const uint16_t*)w.scales)[index]);
        case LB_S_BF16: return bf16_to_float(((const uint16_t*)w.scales)[index]);
        case LB_S_BNB_DQ: {
            float a = w.dq_map[((const uint8_t*)w.scales)[index]] * w.dq_nested[index / 256];
            return a + w.dq_offset;
        }
        default: return ((const float*)w.scales)[index];
    }
}

static inline float affine_zero(const lb_affine& w, int64_t index, int64_t n_groups_total) {
    switch (w.zero_kind) {
        case LB_Z_INT: {
            int64_t nbytes = (n_groups_total * w.bits + 7) / 8;
            return (float)stream_code((const uint8_t*)w.zeros, index, w.bits, nbytes) + w.zero_add;
        }
        case LB_Z_F32: return ((const float*)w.zeros)[index];
        case LB_Z_F16: return half_to_float(((const uint16_t*)w.zeros)[index]);
        case LB_Z_BF16: return bf16_to_float(((const uint16_t*)w.zeros)[index]);
        default: return 0.f;
    }
}

// Scales and zeros of row r, one per group, as floats.
static void affine_row_params(const lb_affine& w, int64_t r, float* s, float* z) {
    int64_t groups = w.k / w.group, first = r * groups;
    const uint16_t* s16 = (const uint16_t*)w.scales + first;
    switch (w.scale_kind) {
        case LB_S_F16: for (int64_t g = 0; g < groups; ++g) s[g] = half_to_float(s16[g]); break;
        case LB_S_BF16: for (int64_t g = 0; g < groups; ++g) s[g] = bf16_to_float(s16[g]); break;
        case LB_S_F32: memcpy(s, (const float*)w.scales + first, groups * sizeof(float)); break;
        default: for (int64_t g = 0; g < groups; ++g) s[g] = affine_scale(w, first + g);
    }
    if (w.zero_kind == LB_Z_NONE)
        for (int64_t g = 0; g < groups; ++g) z[g] = 0.f;
    else
        for (int64_t g = 0; g < groups; ++g) z[g] = affine_zero(w, first + g, w.n * groups);
}

// Columns [c0, c1) of row r: group by group, so that scale and zero are read once per group.
static void decode_affine(const lb_affine& w, int64_t r, int64_t c0, int64_t c1, float* out, int round) {
    int64_t nbytes = (w.n * w.k * w.bits + 7) / 8, groups = w.k / w.group, base = r * w.k;
    for (int64_t g = c0 / w.group; g * w.group < c1; ++g) {
        float s = affine_scale(w, r * groups + g), z = affine_zero(w, r * groups + g, w.n * groups);
        int64_t a = g * w.group > c0 ? g * w.group : c0, b = (g + 1) * w.group < c1 ? (g + 1) * w.group : c1;
        float* o = out + (a - c0);
        if (w.bits == 8 && w.int8_kind) {  // lut[code] = level + lut[0], exactly
            const uint8_t* q = w.codes + base + a;
            for (int64_t c = 0; c < b - a; ++c) {
                float level = w.int8_kind == 1 ? (float)(int8_t)q[c] : (float)q[c];
                o[c] = ((level + w.lut[0]) - z) * s;
            }
        } else if (w.bits == 4) {
            int hi = w.hi_first ? 4 : 0;
            for (int64_t c = a; c < b; ++c) {
                int64_t i = base + c;
                o[c - a] = (w.lut[(w.codes[i >> 1] >> ((i & 1) ? 4 - hi : hi)) & 15] - z) * s;
            }
        } else {
            for (int64_t c = a; c < b; ++c) o[c - a] = (w.lut[stream_code(w.codes, base + c, w.bits, nbytes)] - z) * s;
        }
    }
    if (round)
        for (int64_t c = 0; c < c1 - c0; ++c) out[c] = round_bf16(out[c]);
}

// ---- ggml blocks: one function per type, each decoding whole blocks ----------------------------------

static inline float h16(const uint8_t* p) { uint16_t h; memcpy(&h, p, 2); return half_to_float(h); }

static void q4_0_block(const uint8_t* b, float* o) {
    float d = h16(b);
    for (int j = 0; j < 16; ++j) {
        o[j] = d * (float)((b[2 + j] & 15) - 8);
        o[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void q4_1_block(const uint8_t* b, float* o) {
    float d = h16(b), m = h16(b + 2);
    for (int j = 0; j < 16; ++j) {
        o[j] = d * (float)(b[4 + j] & 15) + m;
        o[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
}

// Runs of 16 weights under one scale, W lanes at a time (so every instruction set vectorises them):
// value = S * q - M, q an integer of `bits` from bytes; the multiply and subtract stay apart (exactness).
static inline void store_run(float* out, V::I q, float S, float M) {
    V::store(out, V::sub(V::mul(V::set1(S), V::cvt(q)), V::set1(M)));
}

static void q5_block(const uint8_t* b, float* o, bool affine) {  // Q5_0 (codes - 16) and Q5_1 (+ min)
    float d = h16(b), m = affine ? -h16(b + 2) : 0.f;               // Fields' dmin is minus the stored min
    const uint8_t* qhp = b + (affine ? 4 : 2);
    const uint8_t* qs = qhp + 4;
    uint32_t qh;
    memcpy(&qh, qhp, 4);
    V::I bias = V::seti(affine ? 0 : 16), one = V::seti(1), nib = V::seti(15), high = V::seti((int)qh);
    for (int l = 0; l < 16; l += V::W) {
        V::I q = V::bytes_u(qs + l);
        V::I lo = V::or_(V::and_(q, nib), V::sll(V::and_(V::srlv(high, V::iota(l)), one), 4));
        V::I hi = V::or_(V::srl(q, 4), V::sll(V::and_(V::srlv(high, V::iota(l + 16)), one), 4));
        store_run(o + l, V::subi(lo, bias), d, m);
        store_run(o + l + 16, V::subi(hi, bias), d, m);
    }
}

static void q8_0_block(const uint8_t* b, float* o) {
    float d = h16(b);
    for (int j = 0; j < 32; ++j) o[j] = d * (float)(int8_t)b[2 + j];
}

// The k-quants: sub-blocks of 16 or 32 weights, each a run under one (scale, min).
static void q2_k_block(const uint8_t* b, float* o) {
    const uint8_t *sc = b, *qs = b + 16;
    float d = h16(b + 80), dmin = h16(b + 82);
    V::I three = V::seti(3);
    for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 4; ++j)
            for (int half = 0; half < 2; ++half) {
                int sub = 8 * h + 2 * j + half;
                float S = d * (float)(sc[sub] & 15), M = dmin * (float)(sc[sub] >> 4);
                for (int l = 0; l < 16; l += V::W)
                    store_run(o + 128 * h + 32 * j + 16 * half + l,
                              V::and_(V::srl(V::bytes_u(qs + 32 * h + 16 * half + l), 2 * j), three), S, M);
            }
}

static void q3_k_block(const uint8_t* b, float* o) {
    const uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    float d = h16(b + 108);
    int sc[16];
    for (int i = 0; i < 8; ++i) { sc[i] = s[i] & 15; sc[i + 8] = s[i] >> 4; }
    for (int j = 0; j < 4; ++j)
        for (int t = 0; t < 4; ++t) sc[4 * j + t] |= ((s[8 + t] >> (2 * j)) & 3) << 4;
    V::I three = V::seti(3), one = V::seti(1), four = V::seti(4);
    for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 4; ++j)
            for (int half = 0; half < 2; ++half) {
                float S = d * (float)(sc[8 * h + 2 * j + half] - 32);
                for (int l = 0; l < 16; l += V::W) {
                    V::I low = V::and_(V::srl(V::bytes_u(qs + 32 * h + 16 * half + l), 2 * j), three);
                    V::I hb = V::and_(V::srl(V::bytes_u(hmask + 16 * half + l), 4 * h + j), one);
                    store_run(o + 128 * h + 32 * j + 16 * half + l, V::subi(V::or_(low, V::sll(hb, 2)), four), S, 0.f);
                }
            }
}

// Q4_K / Q5_K: eight 6-bit (scale, min) pairs in 12 bytes.
static inline void k4_scales(const uint8_t* s, int* sc, int* m) {
    for (int i = 0; i < 4; ++i) {
        sc[i] = s[i] & 63;
        m[i] = s[4 + i] & 63;
        sc[4 + i] = (s[8 + i] & 15) | ((s[i] >> 6) << 4);
        m[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 6) << 4);
    }
}

static void q45_k_block(const uint8_t* b, float* o, bool five) {
    float d = h16(b), dmin = h16(b + 2);
    int sc[8], m[8];
    k4_scales(b + 4, sc, m);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (five ? 48 : 16);
    V::I nib = V::seti(15), one = V::seti(1);
    for (int sub = 0; sub < 8; ++sub) {
        float S = d * (float)sc[sub], M = dmin * (float)m[sub];
        for (int l = 0; l < 32; l += V::W) {
            V::I q = V::and_(V::srl(V::bytes_u(qs + 32 * (sub / 2) + l), 4 * (sub % 2)), nib);
            if (five) q = V::or_(q, V::sll(V::and_(V::srl(V::bytes_u(qh + l), sub), one), 4));
            store_run(o + 32 * sub + l, q, S, M);
        }
    }
}

static void q6_k_block(const uint8_t* b, float* o) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = (const int8_t*)(b + 192);
    float d = h16(b + 208);
    V::I nib = V::seti(15), three = V::seti(3), bias = V::seti(32);
    for (int h = 0; h < 2; ++h)
        for (int quarter = 0; quarter < 4; ++quarter)
            for (int half = 0; half < 2; ++half) {
                float S = d * (float)sc[8 * h + 2 * quarter + half];
                for (int l = 0; l < 16; l += V::W) {
                    V::I low = V::and_(V::srl(V::bytes_u(ql + 64 * h + 32 * (quarter & 1) + 16 * half + l),
                                              quarter < 2 ? 0 : 4), nib);
                    V::I hb = V::and_(V::srl(V::bytes_u(qh + 32 * h + 16 * half + l), 2 * quarter), three);
                    store_run(o + 128 * h + 32 * quarter + 16 * half + l, V::subi(V::or_(low, V::sll(hb, 4)), bias),
                              S, 0.f);
                }
            }
}

// (weights per block, bytes per block) of a ggml type id, or (0, 0) when not a block type.
static inline void ggml_block_shape(int type, int* size, int* bytes) {
    switch (type) {
        case 2: *size = 32; *bytes = 18; return;
        case 3: *size = 32; *bytes = 20; return;
        case 6: *size = 32; *bytes = 22; return;
        case 7: *size = 32; *bytes = 24; return;
        case 8: *size = 32; *bytes = 34; return;
        case 10: *size = 256; *bytes = 84; return;
        case 11: *size = 256; *bytes = 110; return;
        case 12: *size = 256; *bytes = 144; return;
        case 13: *size = 256; *bytes = 176; return;
        case 14: *size = 256; *bytes = 210; return;
        default: *size = 0; *bytes = 0;
    }
}

static void ggml_block(int type, const uint8_t* b, float* o) {
    switch (type) {
        case 2: q4_0_block(b, o); return;
        case 3: q4_1_block(b, o); return;
        case 6: q5_block(b, o, false); return;
        case 7: q5_block(b, o, true); return;
        case 8: q8_0_block(b, o); return;
        case 10: q2_k_block(b, o); return;
        case 11: q3_k_block(b, o); return;
        case 12: q45_k_block(b, o, false); return;
        case 13: q45_k_block(b, o, true); return;
        case 14: q6_k_block(b, o); return;
    }
}

// Columns [c0, c1) of row r (both multiples of the block size).
static void decode_ggml(const lb_ggml& w, int64_t r, int64_t c0, int64_t c1, float* out, int round) {
    int size, bytes;
    ggml_block_shape(w.type, &size, &bytes);
    const uint8_t* row = w.data + r * w.row_bytes;
    for (int64_t c = c0; c < c1; c += size) ggml_block(w.type, row + (c / size) * bytes, out + (c - c0));
    if (round)
        for (int64_t c = 0; c < c1 - c0; ++c) out[c] = round_bf16(out[c]);
}

static void decode_any(int family, const void* ws, int64_t r, int64_t c0, int64_t c1, float* out, int round) {
    if (family == LB_AFFINE) decode_affine(*(const lb_affine*)ws, r, c0, c1, out, round);
    else decode_ggml(*(const lb_ggml*)ws, r, c0, c1, out, round);
}

static inline int64_t family_n(int family, const void* ws) {
    return family == LB_AFFINE ? ((const lb_affine*)ws)->n : ((const lb_ggml*)ws)->n;
}

static inline int64_t family_k(int family, const void* ws) {
    return family == LB_AFFINE ? ((const lb_affine*)ws)->k : ((const lb_ggml*)ws)->k;
}

// sum_c a[c] * b[c] in W lanes (the lanes' partial sums added at the end).
static inline float dot(const float* a, const float* b, int64_t n) {
    V::F acc0 = V::zero(), acc1 = V::zero();
    int64_t c = 0;
    for (; c + 2 * V::W <= n; c += 2 * V::W) {
        acc0 = V::fma(V::load(a + c), V::load(b + c), acc0);
        acc1 = V::fma(V::load(a + c + V::W), V::load(b + c + V::W), acc1);
    }
    for (; c + V::W <= n; c += V::W) acc0 = V::fma(V::load(a + c), V::load(b + c), acc0);
    float s = V::sum(V::add(acc0, acc1));
    for (; c < n; ++c) s += a[c] * b[c];
    return s;
}

}  // namespace
