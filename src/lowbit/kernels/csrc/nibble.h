// The fused 4-bit kernel: y = x W^T straight from packed codes, for any layout of layouts.h.
//
// Per chunk of 8W codes and row: W lanes of codes are loaded once; for each of the 8 nibbles a table
// lookup (vpermps: the level of every code, any 16-level format) and one multiply-add with the permuted
// activations. Scales are applied once per chunk and lane, in one of two ways:
//   factored (float32 activations):  S * sum(L x) - O' * sum(x)        (O' = O*S for SUB_FIRST layouts)
//   rounded (bf16 compute):          sum(round_bf16(w) x) with w computed per weight exactly as the
//                                    Python path computes it, so only the order of the sums differs.
// Several rows run together (R), sharing each activation load; several activation rows (MX <= 4, the
// small batches of decoding) share each decoded weight vector.
#pragma once
#include "layouts.h"

namespace {

// The activations of `m` rows as the kernel reads them, `stride` floats a row: k activations permuted
// chunk by chunk (columns past the last full chunk in their natural order), then [chunks][P][W]: per
// lane and phase the sum of the activations it multiplies (for the offsets).
template <class L>
struct Prepared {
    static int64_t stride(const L& lay, int64_t k) { return k + lay.chunks * L::P * V::W; }
    static void fill(const L& lay, const float* x, int64_t k, int64_t m, float* out) {
        for (int64_t mi = 0; mi < m; ++mi) {
            const float* xr = x + mi * k;
            float* xp = out + mi * stride(lay, k);
            float* xs = xp + k;
            for (int64_t c = 0; c < lay.chunks; ++c) {
                float* s = xs + c * L::P * V::W;
                for (int i = 0; i < L::P * V::W; ++i) s[i] = 0.f;
                for (int k8 = 0; k8 < 8; ++k8)
                    for (int i = 0; i < V::W; ++i) {
                        float v = xr[lay.column(c, i, k8)];
                        xp[c * 8 * V::W + k8 * V::W + i] = v;
                        s[(k8 % L::P) * V::W + i] += v;
                    }
            }
            for (int64_t c = lay.chunks * 8 * V::W; c < k; ++c) xp[c] = xr[c];
        }
    }
};

// The level of each lane's code at this shift: the table entry of the low nibble, plus 16 x the two high
// bits for HIGH2 layouts (the table holds code - 32 there), exact small integers in floats.
template <class L>
static inline V::F levels(V::I v, V::I h, const V::Lut& lut) {
    V::F l = V::lookup(v, lut);
    if constexpr (L::HIGH2) l = V::fma(V::cvt(V::and_(h, V::seti(3))), V::set1(16.f), l);
    return l;
}

template <class L, bool RB>
static inline V::F weights(V::F l, V::F s, V::F o) {  // one weight per lane, exactly as Python computes it
    V::F w = L::SUB_FIRST ? V::mul(V::sub(l, o), s) : V::sub(V::mul(s, l), o);
    return RB ? V::round_bf16(w) : w;
}

// Rows [r, r + R) of y for MX activation rows.
template <class L, int R, int MX, bool RB, bool OFF>
static void nibble_rows(const L& lay, V::Lut lut, const float* xp, int64_t k, int64_t xstride, float* y,
                        int64_t ldy, int64_t r, float* scratch, int64_t scratch_row) {
    constexpr int P = L::P;
    typename L::Row row[R];
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j) lay.start(row[j], r + j, scratch + j * scratch_row);
    const float* xs = xp + k;
    V::F tot[R][MX];
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j)
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i) tot[j][i] = V::zero();
    for (int64_t c = 0; c < lay.chunks; ++c) {
        V::I v[R], h[R];
        V::F S[R][P], O[R][P], acc[R][MX][P];
        #pragma GCC unroll 16
        for (int j = 0; j < R; ++j) {
            v[j] = lay.load(row[j], c);
            h[j] = v[j];
            if constexpr (L::HIGH2) h[j] = lay.high(row[j], c);
            lay.lanes(row[j], c, S[j], O[j]);
            #pragma GCC unroll 16
            for (int i = 0; i < MX; ++i)
                #pragma GCC unroll 16
                for (int p = 0; p < P; ++p) acc[j][i][p] = V::zero();
        }
        const float* xc = xp + c * 8 * V::W;
#pragma GCC unroll 8
        for (int k8 = 0; k8 < 8; ++k8) {
            const int p = k8 % P;
            #pragma GCC unroll 16
            for (int j = 0; j < R; ++j) {
                V::F wv = levels<L>(v[j], h[j], lut);
                if (RB) wv = weights<L, RB>(wv, S[j][p], O[j][p]);
                if constexpr (L::HIGH2) h[j] = V::srl4(h[j]);
                #pragma GCC unroll 16
                for (int i = 0; i < MX; ++i) acc[j][i][p] = V::fma(wv, V::load(xc + i * xstride + k8 * V::W), acc[j][i][p]);
                v[j] = V::srl4(v[j]);
            }
        }
        #pragma GCC unroll 16
        for (int j = 0; j < R; ++j)
            #pragma GCC unroll 16
            for (int i = 0; i < MX; ++i)
                #pragma GCC unroll 16
                for (int p = 0; p < P; ++p) {
                    if (RB) { tot[j][i] = V::add(tot[j][i], acc[j][i][p]); continue; }
                    tot[j][i] = V::fma(S[j][p], acc[j][i][p], tot[j][i]);
                    if (OFF) {
                        V::F o = L::SUB_FIRST ? V::mul(O[j][p], S[j][p]) : O[j][p];
                        V::F sx = V::load(xs + i * xstride + (c * P + p) * V::W);
                        tot[j][i] = V::sub(tot[j][i], V::mul(o, sx));
                    }
                }
    }
    int64_t done = lay.chunks * 8 * V::W;
    float tail[8 * V::W];
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
        if (done < k) lay.tail(r + j, done, tail, RB);
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i) {
            float s = V::sum(tot[j][i]);
            if (done < k) s += dot(tail, xp + i * xstride + done, k - done);
            y[i * ldy + r + j] = s;
        }
    }
}

// Rows [r0, r1) for m activation rows: R rows at a time for one activation row, one row at a time for
// up to four, in groups of four beyond.
template <class L, bool RB, bool OFF>
static void nibble_range_(const L& lay, const float* lut16, const float* xp, int64_t k, int64_t m, float* y,
                         int64_t ldy, int64_t r0, int64_t r1, float* scratch, int64_t scratch_row) {
    V::Lut lut = V::lut(lut16);
    int64_t xs = Prepared<L>::stride(lay, k);
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
        int64_t mi = m - i0 < 4 ? m - i0 : 4;
        const float* x = xp + i0 * xs;
        float* yy = y + i0 * ldy;
        int64_t r = r0;
        if (mi == 1) {
            for (; r + L::R <= r1; r += L::R) nibble_rows<L, L::R, 1, RB, OFF>(lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
            for (; r < r1; ++r) nibble_rows<L, 1, 1, RB, OFF>(lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
        } else {
            for (; r < r1; ++r) {
                if (mi == 2) nibble_rows<L, 1, 2, RB, OFF>(lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
                else if (mi == 3) nibble_rows<L, 1, 3, RB, OFF>(lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
                else nibble_rows<L, 1, 4, RB, OFF>(lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
            }
        }
    }
}

// The offsets cost nothing when absent: a separate instantiation without them.
template <class L, bool RB>
static void nibble_range(const L& lay, const float* lut16, const float* xp, int64_t k, int64_t m, float* y,
                         int64_t ldy, int64_t r0, int64_t r1, float* scratch, int64_t scratch_row) {
    if (lay.offset && !RB) nibble_range_<L, RB, true>(lay, lut16, xp, k, m, y, ldy, r0, r1, scratch, scratch_row);
    else nibble_range_<L, RB, false>(lay, lut16, xp, k, m, y, ldy, r0, r1, scratch, scratch_row);
}

}  // namespace
