// The fused 8-bit kernel (QuantLinear's int8/uint8 codes, ggml's Q8_0) and the generic path (any other
// weight: its exact values decoded a row at a time into scratch, then multiplied).
//
// 8-bit codes need no table: a byte is its level, sign- or zero-extended. Blocks are groups of the
// weight (a multiple of W codes, or the whole row) or Q8_0's 32; the activations keep their order and
// gain one sum per block (for zero points).
#pragma once
#include "decode.h"

namespace {

// How far ahead of the codes being multiplied their stream is fetched (DRAM latency x bandwidth per core).
const int64_t PREFETCH_BYTES = 8192;

struct Bytes8 {
    const uint8_t* data;
    int64_t k, block, blocks, vecs, row_bytes, block_bytes, head;  // head: bytes before a block's codes
    bool q8, is_signed, offset;
    float shift;                                                 // level = byte + shift (implied zero)
    const lb_affine* aff;

    static Bytes8 affine(const lb_affine& w) {
        bool per_row = w.group == w.k;
        int64_t block = w.group, blocks = w.k / w.group, vecs = (per_row ? w.k / V::W : w.group / V::W);
        // code 0 is level 0 on both grids, so lut[0] is minus the implied zero of a symmetric grid
        return Bytes8{w.codes, w.k, block, blocks, vecs, w.k, block, 0, false, w.int8_kind == 1,
                      w.zero_kind != LB_Z_NONE, w.lut[0], &w};
    }
    static Bytes8 q8_0(const lb_ggml& w) {
        return Bytes8{w.data, w.k, 32, w.k / 32, 32 / V::W, w.row_bytes, 34, 2, true, true, false, 0.f, nullptr};
    }
    int64_t stride() const { return k + blocks; }
    V::F levels(const uint8_t* p) const {
        V::F l = V::cvt(is_signed ? V::bytes_s(p) : V::bytes_u(p));
        return shift != 0.f ? V::add(l, V::set1(shift)) : l;
    }
    void fill(const float* x, int64_t m, float* out) const {
        for (int64_t i = 0; i < m; ++i) {
            float* o = out + i * stride();
            memcpy(o, x + i * k, k * sizeof(float));
            for (int64_t b = 0; b < blocks; ++b) {
                float s = 0.f;
                for (int64_t c = b * block; c < (b + 1) * block; ++c) s += x[i * k + c];
                o[k + b] = s;
            }
        }
    }
};

// One vector of codes (v-th of the block at q) times MX activation rows, into accumulator a.
template <int MX, bool RB, int A>
static inline void step(const Bytes8& L, const uint8_t* q, const float* xb, int64_t xstride, int64_t v, V::F S, V::F Z,
                        V::F (&acc)[MX][A], int a) {
    V::F w = L.levels(q + v * V::W);
    if (RB) w = V::round_bf16(L.q8 ? V::mul(S, w) : V::mul(V::sub(w, Z), S));
    #pragma GCC unroll 16
    for (int i = 0; i < MX; ++i) acc[i][a] = V::fma(w, V::load(xb + i * xstride + v * V::W), acc[i][a]);
}

// y[i, r] for activation rows [0, MX) of xp. A row walks its codes once, so a single activation row would
// wait on one chain of multiply-adds: A independent accumulators keep the FMA units busy.
template <int MX, bool RB, int A = (MX == 1 ? 4 : MX == 2 ? 2 : 1)>
static void byte_row(const Bytes8& L, const float* xp, int64_t xstride, float* y, int64_t ldy, int64_t r,
                     float* scratch) {
    const uint8_t* row = L.data + r * L.row_bytes;
    float *s = scratch, *z = scratch + L.blocks;
    if (!L.q8) affine_row_params(*L.aff, r, s, z);
    V::F tot[MX];
    float off[MX];
    #pragma GCC unroll 16
    for (int i = 0; i < MX; ++i) { tot[i] = V::zero(); off[i] = 0.f; }
    for (int64_t b = 0; b < L.blocks; ++b) {
        const uint8_t* q = row + b * L.block_bytes + L.head;
        float sb = L.q8 ? h16(row + b * L.block_bytes) : s[b], zb = L.q8 ? 0.f : z[b];
        V::F S = V::set1(sb), Z = V::set1(zb), acc[MX][A];
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i)
            #pragma GCC unroll 4
            for (int a = 0; a < A; ++a) acc[i][a] = V::zero();
        const float* xb = xp + b * L.block;
        int64_t v = 0;
        for (; v + A <= L.vecs; v += A) {
            __builtin_prefetch(q + v * V::W + PREFETCH_BYTES, 0, 2);   // rows follow each other: one stream
            #pragma GCC unroll 4
            for (int a = 0; a < A; ++a) step<MX, RB>(L, q, xb, xstride, v + a, S, Z, acc, a);
        }
        for (; v < L.vecs; ++v) step<MX, RB>(L, q, xb, xstride, v, S, Z, acc, 0);
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i)
            #pragma GCC unroll 4
            for (int a = 1; a < A; ++a) acc[i][0] = V::add(acc[i][0], acc[i][a]);
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i) {
            tot[i] = RB ? V::add(tot[i], acc[i][0]) : V::fma(S, acc[i][0], tot[i]);
            if (!RB && L.offset) off[i] += (zb * sb) * xp[i * xstride + L.k + b];
        }
    }
    int64_t done = L.blocks == 1 ? L.vecs * V::W : L.k;   // a whole-row block may end in a partial vector
    float* tail = scratch + 2 * L.blocks;
    if (done < L.k) decode_affine(*L.aff, r, done, L.k, tail, RB);
    #pragma GCC unroll 16
    for (int i = 0; i < MX; ++i) {
        float t = V::sum(tot[i]) - off[i];
        if (done < L.k) t += dot(tail, xp + i * xstride + done, L.k - done);
        y[i * ldy + r] = t;
    }
}

template <bool RB>
static void byte_range(const Bytes8& L, const float* xp, int64_t m, float* y, int64_t ldy, int64_t r0, int64_t r1,
                       float* scratch) {
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
        int64_t mi = m - i0 < 4 ? m - i0 : 4;
        const float* x = xp + i0 * L.stride();
        float* yy = y + i0 * ldy;
        for (int64_t r = r0; r < r1; ++r) {
            if (mi == 1) byte_row<1, RB>(L, x, L.stride(), yy, ldy, r, scratch);
            else if (mi == 2) byte_row<2, RB>(L, x, L.stride(), yy, ldy, r, scratch);
            else if (mi == 3) byte_row<3, RB>(L, x, L.stride(), yy, ldy, r, scratch);
            else byte_row<4, RB>(L, x, L.stride(), yy, ldy, r, scratch);
        }
    }
}

// Any weight: decode a row (exact values, natural column order), then one dot product per activation row.
static void generic_range(int family, const void* ws, const float* x, int64_t m, float* y, int64_t ldy,
                          int64_t r0, int64_t r1, int round, float* row) {
    int64_t k = family_k(family, ws);
    for (int64_t r = r0; r < r1; ++r) {
        decode_any(family, ws, r, 0, k, row, round);
        for (int64_t i = 0; i < m; ++i) y[i * ldy + r] = dot(row, x + i * k, k);
    }
}

}  // namespace
