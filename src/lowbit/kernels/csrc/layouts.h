// Where the 4-bit codes of each storage layout sit, seen as the kernel reads them.
//
// The nibble kernel (nibble.h) loads W 32-bit lanes of packed codes at a time (a "chunk" of 8W codes,
// 4W bytes) and walks the eight nibbles of every lane with a 4-bit shift: in chunk c, lane i at shift k
// holds the code of column column(c, i, k) (a chunk's columns are 8W consecutive ones, in a layout's own
// order; Q6_K's come from two places of a super-block). The activations are permuted once per call into
// that order (prep), so the weights are never reordered. Each layout also says which scale (S) and
// offset (O) every lane has, per phase (shift parity: Q4_K's and Q6_K's lanes hold two sub-blocks).
//   SUB_FIRST layouts (QuantLinear, bitsandbytes):  w = (L - O) * S    (O = zero point)
//   the ggml layouts:                                w = S * L - O      (O = dmin * m, or -min)
// HIGH2 layouts (Q6_K) add two high bits per code from a second W-lane vector, walked by the same shift.
#pragma once
#include "decode.h"

namespace {

struct Stream4 {  // QuantLinear's 4-bit stream (low nibble first) or bitsandbytes' (high nibble first)
    static constexpr int P = 1, R = 4;
    static constexpr bool SUB_FIRST = true, HIGH2 = false, SUPER_SUMS = false;
    enum Mode { WHOLE, SPLIT, LANES };   // a chunk within one group / holding whole groups / anything else
    const lb_affine& w;
    int64_t chunks, groups, per_chunk;
    bool offset;
    Mode mode;
    struct Row { const uint8_t* codes; float* s; float* z; int64_t g, used; };  // WHOLE: group, codes used

    explicit Stream4(const lb_affine& w_) : w(w_), chunks(w_.k / (8 * V::W)), groups(w_.k / w_.group),
                                            per_chunk(0), offset(w_.zero_kind != LB_Z_NONE) {
        if (w.group % (8 * V::W) == 0 || w.group == w.k) mode = WHOLE;
        else if ((8 * V::W) % w.group == 0) { mode = SPLIT; per_chunk = 8 * V::W / w.group; }
        else mode = LANES;
    }
    // AVX-512 only: with 8 lanes two tables a row take a blend and twice the registers (16 ymm)
    static constexpr bool TABLES = V::W == 16;
    // Each chunk's lanes [0, W/2) share one scale and zero, and so do lanes [W/2, W).
    bool two_scales() const { return mode == WHOLE || (mode == SPLIT && per_chunk <= 2); }
    static int64_t scratch(const lb_affine& w) { return 2 * (w.k / w.group) + V::W; }
    int64_t column(int64_t c, int i, int k) const { return c * 8 * V::W + 8 * i + (k ^ (w.hi_first ? 1 : 0)); }
    int64_t row_bytes() const { return w.k / 2; }
    const uint8_t* row_ptr(int64_t r) const { return w.codes + r * (w.k / 2); }
    void start(Row& row, int64_t r, float* scratch) const {
        row.codes = w.codes + r * (w.k / 2);
        row.s = scratch;
        row.z = scratch + groups;
        row.g = row.used = 0;
        affine_row_params(w, r, row.s, row.z);
    }
    V::I load(const Row& row, int64_t c) const { return V::loadi(row.codes + c * 4 * V::W); }
    V::F lane_values(const float* v, const Row& row, int64_t c) const {
        if (mode == SPLIT) return V::spread(v + c * per_chunk, (int)per_chunk);
        float lanes[V::W];
        for (int i = 0; i < V::W; ++i) lanes[i] = v[(c * 8 * V::W + 8 * i) / w.group];
        return V::load(lanes);
    }
    // Chunks are visited in order from start(): WHOLE mode counts its way through the groups.
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        if (mode == WHOLE) {
            S[0] = V::set1(row.s[row.g]);
            O[0] = offset ? V::set1(row.z[row.g]) : V::zero();
            if ((row.used += 8 * V::W) == w.group) { row.used = 0; ++row.g; }
            return;
        }
        S[0] = lane_values(row.s, row, c);
        O[0] = offset ? lane_values(row.z, row, c) : V::zero();
    }
    // With two_scales(): the scale and zero of lanes [0, W/2) and of [W/2, W), read as scalars (instead of
    // lanes()); chunks in order, as lanes().
    void half_scales(Row& row, int64_t c, float* s, float* z) const {
        int64_t ga = mode == WHOLE ? row.g : c * per_chunk, gb = mode == WHOLE ? row.g : ga + per_chunk / 2;
        if (mode == WHOLE && (row.used += 8 * V::W) == w.group) { row.used = 0; ++row.g; }
        s[0] = row.s[ga], s[1] = row.s[gb];
        z[0] = offset ? row.z[ga] : 0.f, z[1] = offset ? row.z[gb] : 0.f;
    }
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_affine(w, r, c0, w.k, out, round); }
};

// Q4_0 (d, 16 bytes of codes - 8) and Q4_1 (d, min, codes): W/4 blocks of STRIDE bytes a chunk, codes at QS.
template <int STRIDE, int QS, bool MIN>
struct Legacy4 {
    static constexpr int P = 1, R = 4;
    static constexpr bool SUB_FIRST = false, HIGH2 = false, TABLES = false, SUPER_SUMS = false;
    const lb_ggml& w;
    int64_t chunks;
    bool offset = MIN;
    struct Row { const uint8_t* blocks; };

    explicit Legacy4(const lb_ggml& w_) : w(w_), chunks(w_.k / (8 * V::W)) {}
    static int64_t scratch(const lb_ggml&) { return 0; }
    int64_t column(int64_t c, int i, int k) const {
        return c * 8 * V::W + 32 * (i / 4) + 16 * (k % 2) + 4 * (i % 4) + k / 2;
    }
    int64_t row_bytes() const { return w.row_bytes; }
    const uint8_t* row_ptr(int64_t r) const { return w.data + r * w.row_bytes; }
    void start(Row& row, int64_t r, float*) const { row.blocks = w.data + r * w.row_bytes; }
    V::I load(const Row& row, int64_t c) const { return V::pieces16(row.blocks + c * (V::W / 4) * STRIDE + QS, STRIDE); }
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        const uint8_t* b = row.blocks + c * (V::W / 4) * STRIDE;
        S[0] = V::template halves4<STRIDE, 0>(b);
        O[0] = MIN ? V::mul(V::template halves4<STRIDE, 2>(b), V::set1(-1.f)) : V::zero();  // Fields' dmin = -min
    }
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_ggml(w, r, c0, w.k, out, round); }
};
typedef Legacy4<18, 2, false> Q4_0L;
typedef Legacy4<20, 4, true> Q4_1L;

struct K4 {  // Q4_K: super-blocks of 256 (8 sub-blocks of 32, 6-bit scales and mins), 8W codes a chunk
    static constexpr int P = 2, R = 2;
    static constexpr bool SUB_FIRST = false, HIGH2 = false, TABLES = false;
    static constexpr int PER_SUPER = 128 / (4 * V::W);    // chunks per super-block
    // AVX-512: the mins' part of a super-block is one multiply-add of `all` (lanes 8..15: dmin * m) with the
    // activation sums of its 8 sub-blocks (prepared in lanes 8..15 of the super-block's first chunk), not a
    // multiply and subtract per chunk and phase.
    static constexpr bool SUPER_SUMS = V::W == 16;
    int64_t super_sum_at(int64_t c, int i, int k8) const {   // index into the sums of the prepared row
        return (c - c % PER_SUPER) * P * V::W + 8 + (column(c, i, k8) % 256) / 32;
    }
    const lb_ggml& w;
    int64_t chunks;
    bool offset = true;
    struct Row { const uint8_t* blocks; float* sm; V::F all; };  // d*sc[0..7] then dmin*m[0..7]
    V::F super_mins(const Row& row) const { return row.all; }

    explicit K4(const lb_ggml& w_) : w(w_), chunks(w_.k / (8 * V::W)) {}
    static int64_t scratch(const lb_ggml&) { return 16; }
    int64_t column(int64_t c, int i, int k) const {
        return c * 8 * V::W + 64 * (i / 8) + 32 * (k % 2) + 4 * (i % 8) + k / 2;
    }
    int64_t row_bytes() const { return w.row_bytes; }
    const uint8_t* row_ptr(int64_t r) const { return w.data + r * w.row_bytes; }
    void start(Row& row, int64_t r, float* scratch) const { row.blocks = w.data + r * w.row_bytes; row.sm = scratch; }
    V::I load(const Row& row, int64_t c) const {
        return V::loadi(row.blocks + (c / PER_SUPER) * 144 + 16 + (c % PER_SUPER) * 4 * V::W);
    }
#if LB_ISA == 2
    // The sixteen 6-bit integers in lanes (scales 0..7, mins 8..15), unpacked with two permutes, then
    // d * sc and dmin * m in one multiply: no scalar work per super-block, and each chunk's lane scales
    // are one permute away.
    static V::F unpack(const uint8_t* b) {
        const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + 4)));  // 12 bytes (+4 read)
        const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11);
        const __m512i sa = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4);
        const __m512i ma = _mm512_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
        const __m512i ib = _mm512_setr_epi32(0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7);
        const __m512i mb = _mm512_setr_epi32(0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 48, 48, 48, 48);
        __m512i a = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(ia, s), sa), ma);
        __m512i hb = _mm512_and_si512(_mm512_slli_epi32(_mm512_srli_epi32(_mm512_permutexvar_epi32(ib, s), 6), 4), mb);
        __m512 dd = _mm512_insertf32x8(_mm512_set1_ps(h16(b)), _mm256_set1_ps(h16(b + 2)), 1);
        return _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_or_si512(a, hb)));
    }
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        int part = (int)(c % PER_SUPER);
        if (part == 0) row.all = unpack(row.blocks + (c / PER_SUPER) * 144);
        // lanes 0..7 read sub-block 4 part + p, lanes 8..15 sub-block 4 part + 2 + p (mins 8 further)
        const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        for (int p = 0; p < 2; ++p) {
            __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(4 * part + p));
            S[p] = _mm512_permutexvar_ps(idx, row.all);
            O[p] = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(8)), row.all);
        }
    }
#else
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        int part = (int)(c % PER_SUPER);   // 8 lanes: one 64-weight half (sub-blocks 2 part, 2 part + 1)
        if (part == 0) {
            const uint8_t* b = row.blocks + (c / PER_SUPER) * 144;
            float d = h16(b), dmin = h16(b + 2);
            int sc[8], m[8];
            k4_scales(b + 4, sc, m);
            for (int j = 0; j < 8; ++j) { row.sm[j] = d * (float)sc[j]; row.sm[8 + j] = dmin * (float)m[j]; }
        }
        for (int p = 0; p < 2; ++p) {
            S[p] = V::set1(row.sm[2 * part + p]);
            O[p] = V::set1(row.sm[8 + 2 * part + p]);
        }
    }
#endif
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_ggml(w, r, c0, w.k, out, round); }
};

// Q6_K: per super-block 128 bytes of low nibbles (ql), 64 of high 2-bit pairs (qh), 16 int8 scales, fp16 d.
// A 128-weight half h keeps quarter q (32 weights) at ql[64h + 32(q % 2) + l], low nibble for q < 2, and
// its high bits at qh[32h + l] >> 2q. Lane i reads ql dword (region r, li): r = 0 holds quarters 0 and 2,
// r = 1 quarters 1 and 3, so shift k (nibble k) is quarter r + 2(k % 2), l = 4 li + k / 2, and the high
// bits of the same weight sit 4k + 2r bits up the qh dword li: one 4-bit shift walks both.
// AVX-512: a chunk is a half (lanes 0..7 region 0, 8..15 region 1); 8 lanes: a chunk is one region.
struct K6 {
    static constexpr int P = 2, R = 2;
    static constexpr bool SUB_FIRST = false, HIGH2 = true, TABLES = false, SUPER_SUMS = false;
    static constexpr int PER_SUPER = 16 / V::W * 2;       // chunks per super-block: 2 (W 16) or 4 (W 8)
    const lb_ggml& w;
    int64_t chunks;
    bool offset = false;
    struct Row { const uint8_t* blocks; float* ds; };   // d * sc of the current super-block

    explicit K6(const lb_ggml& w_) : w(w_), chunks(w_.k / (8 * V::W)) {}
    static int64_t scratch(const lb_ggml&) { return 16; }
    static int region(int64_t c, int i) { return V::W == 16 ? i / 8 : (int)(c % 2); }
    static int half(int64_t c) { return (int)(c % PER_SUPER) / (V::W == 16 ? 1 : 2); }
    int64_t column(int64_t c, int i, int k) const {
        int quarter = region(c, i) + 2 * (k % 2), l = 4 * (i % 8) + k / 2;
        return (c / PER_SUPER) * 256 + 128 * half(c) + 32 * quarter + l;
    }
    int64_t row_bytes() const { return w.row_bytes; }
    const uint8_t* row_ptr(int64_t r) const { return w.data + r * w.row_bytes; }
    void start(Row& row, int64_t r, float* scratch) const { row.blocks = w.data + r * w.row_bytes; row.ds = scratch; }
    const uint8_t* block(const Row& row, int64_t c) const { return row.blocks + (c / PER_SUPER) * 210; }
    V::I load(const Row& row, int64_t c) const {
        return V::loadi(block(row, c) + 64 * half(c) + (V::W == 16 ? 0 : 32 * (c % 2)));
    }
    V::I high(const Row& row, int64_t c) const {  // qh dwords, pre-shifted by 2r so that lane bits align
        const uint8_t* qh = block(row, c) + 128 + 32 * half(c);
#if LB_ISA == 2
        return V::srlv(V::twice32(qh), V::sll(V::srl(V::iota(0), 3), 1));   // lanes 8..15 (region 1) by 2
#else
        return V::srl(V::loadi(qh), 2 * (int)(c % 2));
#endif
    }
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        const uint8_t* b = block(row, c);
        if (c % PER_SUPER == 0) {   // vector stores, so that the loads below are forwarded from them
            V::F d = V::set1(h16(b + 208));
            for (int j = 0; j < 16; j += V::W) V::store(row.ds + j, V::mul(d, V::cvt(V::bytes_s(b + 192 + j))));
        }
        // lane i, phase p: sub-block 8h + 4p + 2r + li/4
        int h = half(c);
        for (int p = 0; p < 2; ++p) {
            const float* s = row.ds + 8 * h + 4 * p;
            S[p] = V::W == 16 ? V::spread(s, 4) : V::pair(s[2 * (c % 2)], s[2 * (c % 2) + 1]);
            O[p] = V::zero();
        }
    }
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_ggml(w, r, c0, w.k, out, round); }
};

}  // namespace
