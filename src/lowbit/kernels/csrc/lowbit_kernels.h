// The plain C interface between Python (ctypes, lowbit/kernels/native.py mirrors these structs), the
// dispatcher (api.cpp) and the three compiled copies of the kernels (isa.cpp).
//
// A weight is described, never copied: pointers into the module's own buffers, in the layouts
// lowbit.nn stores (QuantLinear's bit stream, bitsandbytes' 4-bit blocks, ggml blocks).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LB_API __attribute__((visibility("default")))

enum { LB_SCALAR = 0, LB_AVX2 = 1, LB_AVX512 = 2 };
enum { LB_AFFINE = 0, LB_GGML = 1 };                                      // weight families
enum { LB_S_F32 = 0, LB_S_F16 = 1, LB_S_BF16 = 2, LB_S_BNB_DQ = 3 };     // how scales are stored
enum { LB_Z_NONE = 0, LB_Z_INT = 1, LB_Z_F32 = 2, LB_Z_F16 = 3, LB_Z_BF16 = 4 };  // how zero points are stored
enum { LB_ROUND_NONE = 0, LB_ROUND_BF16 = 1 };                           // per-weight rounding before the products

// w[r, c] = (lut[code(r, c)] - zero(r, g)) * scale(r, g), g = c / group: QuantLinear's integer and 4-bit
// formats (codes a little-endian bit stream over the whole [n, k] tensor), and bitsandbytes' NF4/FP4
// (hi_first: the first code of a byte in its high nibble; scale = absmax of the block, rows hold whole
// blocks). lut holds 1 << bits levels, the implied zero of a symmetric grid already subtracted.
typedef struct {
    const uint8_t* codes;
    int64_t n, k, group;          // group = k for one scale per row
    int32_t bits, hi_first;
    int32_t int8_kind;            // 8-bit codes: 1 = int8 levels, 2 = uint8 levels, 0 = through lut
    int32_t scale_kind, zero_kind, pad;
    const void* scales;           // [n, k / group] (bnb: [n * k / group] absmax, or its 8-bit codes)
    const void* zeros;            // LB_Z_INT: `bits`-bit stream over [n, k / group]; else [n, k / group]
    float zero_add;               // added to integer zero codes (the grid's qmin)
    float dq_offset;              // bnb double quantisation: absmax = dq_map[code] * dq_nested[b / 256] + offset
    const float* lut;
    const float* dq_map;
    const float* dq_nested;
} lb_affine;

// ggml blocks (GGUF's bytes): row r is row_bytes bytes at data + r * row_bytes; type is the ggml type id.
typedef struct {
    const uint8_t* data;
    int64_t n, k, row_bytes;
    int32_t type, pad;
} lb_ggml;

// What one compiled copy of the kernels offers (isa.cpp). `ws` is a weight struct of `family`.
typedef struct {
    int32_t lanes;
    // Floats per activation row as the kernels read them (prep: m rows of x [m, k] into [m, stride]).
    int64_t (*prep_stride)(int family, const void* ws);
    void (*prep)(int family, const void* ws, const float* x, int64_t m, float* prep);
    // y[i, r] (ldy between rows of y) for r in [r0, r1) and m rows of x; scratch: row_scratch() floats.
    void (*rows)(int family, const void* ws, const float* x, const float* prep, int64_t m, float* y, int64_t ldy,
                 int64_t r0, int64_t r1, int round, float* scratch);
    int64_t (*row_scratch)(int family, const void* ws);
    // Exact float32 values of rows [r0, r1) into out [r1 - r0, k] (rounded to bf16 when asked).
    // Columns in the order prep() puts the activations (the first k floats of a prepared row).
    void (*decode)(int family, const void* ws, int64_t r0, int64_t r1, float* out, int round);
    void (*order)(int family, const void* ws, int32_t* cols);
} lb_table;

const lb_table* lb_table_scalar(void);
const lb_table* lb_table_avx2(void);
const lb_table* lb_table_avx512(void);

#ifdef __cplusplus
}
#endif
