// One compiled copy of the kernels for the instruction set LB_ISA (0 baseline, 1 AVX2, 2 AVX-512), exported
// as a table of functions (lowbit_kernels.h). Which kernel serves a weight:
//   4-bit QuantLinear / bitsandbytes codes, Q4_0, Q4_1, Q4_K, Q6_K   -> nibble.h (fused)
//   8-bit integer QuantLinear codes, Q8_0                               -> bytes.h (fused)
//   everything else (int2/3/5..7, fp8 codes, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K)  -> decode a row, then dot
#include <stdlib.h>

#include <type_traits>

#include "bytes.h"
#include "nibble.h"

#define LAYOUT_OF(l) typename std::decay<decltype(l)>::type

namespace {

enum Kind { STREAM4, Q4_0K, Q4_1K, K4Q, K6Q, BYTES, GENERIC };

const float LUT_Q4_0[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
const float LUT_U4[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
const float LUT_Q6[16] = {-32, -31, -30, -29, -28, -27, -26, -25, -24, -23, -22, -21, -20, -19, -18, -17};

Kind kind_of(int family, const void* ws) {
    if (family == LB_AFFINE) {
        const lb_affine& w = *(const lb_affine*)ws;
        bool lanes_in_groups = w.group == w.k || w.group % 8 == 0;
        if (w.bits == 4 && w.k % 2 == 0 && lanes_in_groups) return STREAM4;
        if (w.bits == 8 && w.int8_kind != 0 && (w.group == w.k || w.group % V::W == 0)) return BYTES;
        return GENERIC;
    }
    const lb_ggml& g = *(const lb_ggml*)ws;
    if (g.type == 2) return Q4_0K;
    if (g.type == 3) return Q4_1K;
    if (g.type == 12) return K4Q;
    if (g.type == 14) return K6Q;
    if (g.type == 8) return BYTES;
    return GENERIC;
}

Bytes8 bytes_of(int family, const void* ws) {
    return family == LB_AFFINE ? Bytes8::affine(*(const lb_affine*)ws) : Bytes8::q8_0(*(const lb_ggml*)ws);
}

// Calls f(layout, lut) for the nibble layouts; returns false for the others.
template <class Fn>
bool with_nibble_layout(int family, const void* ws, Fn f) {
    switch (kind_of(family, ws)) {
        case STREAM4: { Stream4 l(*(const lb_affine*)ws); f(l, ((const lb_affine*)ws)->lut); return true; }
        case Q4_0K: { Q4_0L l(*(const lb_ggml*)ws); f(l, LUT_Q4_0); return true; }
        case Q4_1K: { Q4_1L l(*(const lb_ggml*)ws); f(l, LUT_U4); return true; }
        case K4Q: { K4 l(*(const lb_ggml*)ws); f(l, LUT_U4); return true; }
        case K6Q: { K6 l(*(const lb_ggml*)ws); f(l, LUT_Q6); return true; }
        default: return false;
    }
}

int64_t prep_stride(int family, const void* ws) {
    int64_t stride = family_k(family, ws);
    if (with_nibble_layout(family, ws, [&](auto& l, const float*) {
            stride = Prepared<LAYOUT_OF(l)>::stride(l, family_k(family, ws));
        }))
        return stride;
    if (kind_of(family, ws) == BYTES) return bytes_of(family, ws).stride();
    return stride;
}

void prep(int family, const void* ws, const float* x, int64_t m, float* out) {
    int64_t k = family_k(family, ws);
    if (with_nibble_layout(family, ws, [&](auto& l, const float*) {
            Prepared<LAYOUT_OF(l)>::fill(l, x, k, m, out);
        }))
        return;
    if (kind_of(family, ws) == BYTES) return bytes_of(family, ws).fill(x, m, out);
    memcpy(out, x, m * k * sizeof(float));
}

int64_t row_scratch(int family, const void* ws) {
    int64_t k = family_k(family, ws), n = 8 * V::W + k;  // a row (generic), or a tail
    if (family == LB_AFFINE) {
        const lb_affine& w = *(const lb_affine*)ws;
        n += 4 * (2 * (w.k / w.group) + V::W);
    } else {
        n += 64;
    }
    return n;
}

void rows(int family, const void* ws, const float* x, const float* xp, int64_t m, float* y, int64_t ldy,
          int64_t r0, int64_t r1, int round, float* scratch) {
    int64_t k = family_k(family, ws);
    bool done = with_nibble_layout(family, ws, [&](auto& l, const float* lut) {
        typedef LAYOUT_OF(l) L;
        int64_t per_row = L::scratch(l.w);
        if (round) nibble_range<L, true>(l, lut, xp, k, m, y, ldy, r0, r1, scratch, per_row);
        else nibble_range<L, false>(l, lut, xp, k, m, y, ldy, r0, r1, scratch, per_row);
    });
    if (done) return;
    if (kind_of(family, ws) == BYTES) {
        Bytes8 b = bytes_of(family, ws);
        if (round) byte_range<true>(b, xp, m, y, ldy, r0, r1, scratch);
        else byte_range<false>(b, xp, m, y, ldy, r0, r1, scratch);
        return;
    }
    generic_range(family, ws, x, m, y, ldy, r0, r1, round, scratch);
}

// Rows [r0, r1) into out, columns in the order prep() gives the activations (the fused layouts permute
// whole chunks; the rest keep their order), so that out @ prepared^T is the product.
void decode(int family, const void* ws, int64_t r0, int64_t r1, float* out, int round) {
    int64_t k = family_k(family, ws);
    bool done = with_nibble_layout(family, ws, [&](auto& l, const float* lut16) {
        typedef LAYOUT_OF(l) L;
        V::Lut lut = V::lut(lut16);
        float* scratch = (float*)malloc(L::scratch(l.w) * sizeof(float));
        for (int64_t r = r0; r < r1; ++r) {
            typename L::Row row;
            l.start(row, r, scratch);
            float* o = out + (r - r0) * k;
            for (int64_t c = 0; c < l.chunks; ++c) {
                V::I v = l.load(row, c), h = v;
                if constexpr (L::HIGH2) h = l.high(row, c);
                V::F S[L::P], O[L::P];
                l.lanes(row, c, S, O);
                for (int k8 = 0; k8 < 8; ++k8) {
                    V::F w = levels<L>(v, h, lut), s = S[k8 % L::P], z = O[k8 % L::P];
                    w = round ? weights<L, true>(w, s, z) : weights<L, false>(w, s, z);
                    V::store(o + c * 8 * V::W + k8 * V::W, w);
                    v = V::srl4(v);
                    h = V::srl4(h);
                }
            }
            if (l.chunks * 8 * V::W < k) l.tail(r, l.chunks * 8 * V::W, o + l.chunks * 8 * V::W, round);
        }
        free(scratch);
    });
    if (done) return;
    for (int64_t r = r0; r < r1; ++r) decode_any(family, ws, r, 0, k, out + (r - r0) * k, round);
}

// The column each prepared position holds.
void order(int family, const void* ws, int32_t* cols) {
    int64_t k = family_k(family, ws);
    for (int64_t c = 0; c < k; ++c) cols[c] = (int32_t)c;
    with_nibble_layout(family, ws, [&](auto& l, const float*) {
        for (int64_t c = 0; c < l.chunks; ++c)
            for (int k8 = 0; k8 < 8; ++k8)
                for (int i = 0; i < V::W; ++i) cols[c * 8 * V::W + k8 * V::W + i] = (int32_t)l.column(c, i, k8);
    });
}

}  // namespace

#if LB_ISA == 2
#define LB_TABLE lb_table_avx512
#elif LB_ISA == 1
#define LB_TABLE lb_table_avx2
#else
#define LB_TABLE lb_table_scalar
#endif

static const lb_table TABLE = {V::W, prep_stride, prep, rows, row_scratch, decode, order};

extern "C" const lb_table* LB_TABLE(void) { return &TABLE; }
