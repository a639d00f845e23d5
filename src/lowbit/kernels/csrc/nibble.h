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
                        if constexpr (L::SUPER_SUMS) xs[lay.super_sum_at(c, i, k8)] += v;
                        else s[(k8 % L::P) * V::W + i] += v;
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

// The hardware prefetcher follows one stream well, not R short interleaved ones (a 2048-wide int4 row is 16
// cache lines, and a block of R rows is read side by side): at chunk c the same share (per_chunk bytes) of the
// next R rows (from `next`) is fetched into L1 and of the R rows after those into L2, so DRAM latency stays
// hidden behind the arithmetic (decoding a 0.38B model: 20-40% faster, benchmarks/decode.py). Always inlined:
// a call would spill the callers' vector accumulators (every zmm is caller-saved), 1.7x slower.
template <int R>
__attribute__((always_inline)) static inline void prefetch_rows(const uint8_t* next, int64_t bytes,
                                                             int64_t per_chunk, int64_t c) {
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j)
        for (int64_t off = (c * per_chunk) & ~(int64_t)63; off < (c + 1) * per_chunk; off += 64)
            __builtin_prefetch(next + j * bytes + off, 0, 3);
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j)
        for (int64_t off = (c * per_chunk) & ~(int64_t)63; off < (c + 1) * per_chunk; off += 64)
            __builtin_prefetch(next + (R + j) * bytes + off, 0, 2);
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
    const int64_t bytes = lay.row_bytes(), per_chunk = lay.chunks ? bytes / lay.chunks : 0;
    const uint8_t* next = lay.row_ptr(r + R);
    for (int64_t c = 0; c < lay.chunks; ++c) {
        prefetch_rows<R>(next, bytes, per_chunk, c);
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
            if constexpr (L::SUPER_SUMS)
                if (OFF && c % L::PER_SUPER == 0)
                    #pragma GCC unroll 16
                    for (int i = 0; i < MX; ++i)
                        tot[j][i] = V::sub(tot[j][i], V::mul(lay.super_mins(row[j]), V::load(xs + i * xstride + c * P * V::W)));
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
                    if (OFF && !L::SUPER_SUMS) {
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

// bf16 compute (RB) for layouts whose chunks hold at most two (scale, zero) pairs, one for lanes [0, W/2) and
// one for [W/2, W) (NF4 / FP4 blocks of 64, int4 groups): the 16 rounded weights of each half are computed
// once per chunk, by the same expression as weights<L, true> and so to the same bits, and each code looks
// its weight up directly. What was a subtract, a multiply and a rounding per weight is now one permute.
template <class L, int R, int MX>
static void table_rows(const L& lay, V::Lut lut, const float* xp, int64_t k, int64_t xstride, float* y,
                       int64_t ldy, int64_t r, float* scratch, int64_t scratch_row) {
    typename L::Row row[R];
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j) lay.start(row[j], r + j, scratch + j * scratch_row);
    V::F tot[R][MX][2];   // two chains a row: alternate shifts, so the multiply-adds overlap
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j)
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i) tot[j][i][0] = tot[j][i][1] = V::zero();
    const int64_t bytes = lay.row_bytes(), per_chunk = lay.chunks ? bytes / lay.chunks : 0;
    const uint8_t* next = lay.row_ptr(r + R);
    for (int64_t c = 0; c < lay.chunks; ++c) {
        prefetch_rows<R>(next, bytes, per_chunk, c);
        V::I ev[R], od[R];
        V::Tab2 t[R];
        #pragma GCC unroll 16
        for (int j = 0; j < R; ++j) {
            V::I v = lay.load(row[j], c);
            ev[j] = V::even_idx(v);
            od[j] = V::odd_idx(v);
            float sc[2], z[2];
            lay.half_scales(row[j], c, sc, z);
            V::F sa = V::set1(sc[0]), sb = V::set1(sc[1]), oa = V::set1(z[0]), ob = V::set1(z[1]);
            t[j] = V::tab2(V::map(lut, [&](V::F l) { return weights<L, true>(l, sa, oa); }),
                           V::map(lut, [&](V::F l) { return weights<L, true>(l, sb, ob); }));
        }
        const float* xc = xp + c * 8 * V::W;
#pragma GCC unroll 8
        for (int k8 = 0; k8 < 8; ++k8) {
            #pragma GCC unroll 16
            for (int j = 0; j < R; ++j) {
                V::F wv = V::lookup2(k8 & 1 ? od[j] : ev[j], t[j]);
                #pragma GCC unroll 16
                for (int i = 0; i < MX; ++i)
                    tot[j][i][k8 & 1] = V::fma(wv, V::load(xc + i * xstride + k8 * V::W), tot[j][i][k8 & 1]);
                if (k8 & 1) od[j] = V::srl8(od[j]);
                else ev[j] = V::srl8(ev[j]);
            }
        }
    }
    int64_t done = lay.chunks * 8 * V::W;
    float tail[8 * V::W];
    #pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
        if (done < k) lay.tail(r + j, done, tail, true);
        #pragma GCC unroll 16
        for (int i = 0; i < MX; ++i) {
            float s = V::sum(V::add(tot[j][i][0], tot[j][i][1]));
            if (done < k) s += dot(tail, xp + i * xstride + done, k - done);
            y[i * ldy + r + j] = s;
        }
    }
}

// Rows [r, r + R) for MX activation rows, through the table path when it applies.
template <class L, int R, int MX, bool RB, bool OFF>
static inline void some_rows(bool tables, const L& lay, V::Lut lut, const float* xp, int64_t k, int64_t xstride,
                             float* y, int64_t ldy, int64_t r, float* scratch, int64_t scratch_row) {
    if constexpr (RB && L::TABLES && L::P == 1 && !L::HIGH2)
        if (tables) return table_rows<L, R, MX>(lay, lut, xp, k, xstride, y, ldy, r, scratch, scratch_row);
    nibble_rows<L, R, MX, RB, OFF>(lay, lut, xp, k, xstride, y, ldy, r, scratch, scratch_row);
}

// Rows [r0, r1) for m activation rows: R rows at a time for one activation row, one row at a time for
// up to four, in groups of four beyond.
template <class L, bool RB, bool OFF>
static void nibble_range_(const L& lay, const float* lut16, const float* xp, int64_t k, int64_t m, float* y,
                         int64_t ldy, int64_t r0, int64_t r1, float* scratch, int64_t scratch_row) {
    V::Lut lut = V::lut(lut16);
    int64_t xs = Prepared<L>::stride(lay, k);
    bool tables = false;
    if constexpr (L::TABLES) tables = RB && lay.two_scales();
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
        int64_t mi = m - i0 < 4 ? m - i0 : 4;
        const float* x = xp + i0 * xs;
        float* yy = y + i0 * ldy;
        int64_t r = r0;
        if (mi == 1) {
            for (; r + L::R <= r1; r += L::R) some_rows<L, L::R, 1, RB, OFF>(tables, lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
            for (; r < r1; ++r) some_rows<L, 1, 1, RB, OFF>(tables, lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
        } else {
            for (; r < r1; ++r) {
                if (mi == 2) some_rows<L, 1, 2, RB, OFF>(tables, lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
                else if (mi == 3) some_rows<L, 1, 3, RB, OFF>(tables, lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
                else some_rows<L, 1, 4, RB, OFF>(tables, lay, lut, x, k, xs, yy, ldy, r, scratch, scratch_row);
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
