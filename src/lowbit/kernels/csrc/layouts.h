// Where the 4-bit codes of each storage layout sit, seen as the kernel reads them.
//
// The nibble kernel (nibble.h) loads W 32-bit lanes of packed codes at a time (a "chunk" of 8W codes,
// 4W bytes) and walks the eight nibbles of every lane with a 4-bit shift: lane i at shift k holds the
// code of column elem(i, k) of the chunk. The activations are permuted once per call into that order
// (prep), so the weights are never reordered. Each layout also says which scale (S) and offset (O) every
// lane has, per phase (shift parity: Q4_K's two sub-blocks share a lane).
//   SUB_FIRST layouts (QuantLinear, bitsandbytes):  w = (L - O) * S    (O = zero point)
//   the ggml layouts:                                w = S * L - O      (O = dmin * m, or -min)
#pragma once
#include "decode.h"

namespace {

struct Stream4 {  // QuantLinear's 4-bit stream (low nibble first) or bitsandbytes' (high nibble first)
    static constexpr int P = 1, R = 4;
    static constexpr bool SUB_FIRST = true;
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
    static int64_t scratch(const lb_affine& w) { return 2 * (w.k / w.group) + V::W; }
    int elem(int i, int k) const { return 8 * i + (k ^ (w.hi_first ? 1 : 0)); }
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
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_affine(w, r, c0, w.k, out, round); }
};

struct Legacy4 {  // Q4_0 (d, 16 bytes of codes - 8) and Q4_1 (d, min, codes): W/4 blocks a chunk
    static constexpr int P = 1, R = 4;
    static constexpr bool SUB_FIRST = false;
    const lb_ggml& w;
    int64_t chunks, stride;
    bool offset;
    struct Row { const uint8_t* blocks; };

    explicit Legacy4(const lb_ggml& w_) : w(w_), chunks(w_.k / (8 * V::W)), stride(w_.type == 2 ? 18 : 20),
                                          offset(w_.type == 3) {}
    static int64_t scratch(const lb_ggml&) { return 0; }
    int elem(int i, int k) const { return 32 * (i / 4) + 16 * (k % 2) + 4 * (i % 4) + k / 2; }
    void start(Row& row, int64_t r, float*) const { row.blocks = w.data + r * w.row_bytes; }
    V::I load(const Row& row, int64_t c) const {
        return V::pieces16(row.blocks + c * (V::W / 4) * stride + (offset ? 4 : 2), stride);
    }
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        const uint8_t* b = row.blocks + c * (V::W / 4) * stride;
        float d[V::W / 4], m[V::W / 4];
        for (int j = 0; j < V::W / 4; ++j) {
            d[j] = h16(b + j * stride);
            m[j] = offset ? -h16(b + j * stride + 2) : 0.f;  // Fields' dmin is minus the stored min
        }
        S[0] = V::spread(d, V::W / 4);
        O[0] = offset ? V::spread(m, V::W / 4) : V::zero();
    }
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_ggml(w, r, c0, w.k, out, round); }
};

struct K4 {  // Q4_K: super-blocks of 256 (8 sub-blocks of 32, 6-bit scales and mins), 8W codes a chunk
    static constexpr int P = 2, R = 2;
    static constexpr bool SUB_FIRST = false;
    static constexpr int PER_SUPER = 128 / (4 * V::W);    // chunks per super-block
    const lb_ggml& w;
    int64_t chunks;
    bool offset = true;
    struct Row { const uint8_t* blocks; float* even; float* odd; };  // d*sc then dmin*m, by sub-block parity

    explicit K4(const lb_ggml& w_) : w(w_), chunks(w_.k / (8 * V::W)) {}
    static int64_t scratch(const lb_ggml&) { return 16; }
    int elem(int i, int k) const { return 64 * (i / 8) + 32 * (k % 2) + 4 * (i % 8) + k / 2; }
    void start(Row& row, int64_t r, float* scratch) const {
        row.blocks = w.data + r * w.row_bytes;
        row.even = scratch;
        row.odd = scratch + 8;
    }
    V::I load(const Row& row, int64_t c) const {
        return V::loadi(row.blocks + (c / PER_SUPER) * 144 + 16 + (c % PER_SUPER) * 4 * V::W);
    }
    void lanes(Row& row, int64_t c, V::F* S, V::F* O) const {
        int part = (int)(c % PER_SUPER);
        if (part == 0) {
            const uint8_t* b = row.blocks + (c / PER_SUPER) * 144;
            float d = h16(b), dmin = h16(b + 2);
            int sc[8], m[8];
            k4_scales(b + 4, sc, m);
            for (int j = 0; j < 4; ++j) {
                row.even[j] = d * (float)sc[2 * j];
                row.odd[j] = d * (float)sc[2 * j + 1];
                row.even[4 + j] = dmin * (float)m[2 * j];
                row.odd[4 + j] = dmin * (float)m[2 * j + 1];
            }
        }
        int n = V::W / 8, first = part * n;  // sub-block pairs in this chunk
        S[0] = V::spread(row.even + first, n);
        S[1] = V::spread(row.odd + first, n);
        O[0] = V::spread(row.even + 4 + first, n);
        O[1] = V::spread(row.odd + 4 + first, n);
    }
    void tail(int64_t r, int64_t c0, float* out, int round) const { decode_ggml(w, r, c0, w.k, out, round); }
};

}  // namespace
