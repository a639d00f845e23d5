// The library's C entry points (called from Python through ctypes): instruction-set dispatch at run time
// and the threads. Compiled with the baseline flags only; the kernels live in the three isa.cpp copies.
//
// Threads come from OpenMP. The library is linked against libgomp.so.1, the runtime torch's CPU wheel
// itself loads under that name, so the kernels share torch's thread pool (torch.set_num_threads applies)
// instead of competing with it.
#include <omp.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "lowbit_kernels.h"

namespace {

// Below this many weights a product runs on the calling thread: waking the pool costs more than it saves
// (torch keeps its OpenMP threads warm, so from about 64K weights, a 256x256 layer, two threads win); more
// threads only as the product grows, so that no thread gets a sliver of a small layer.
const int64_t PARALLEL_MIN_WEIGHTS = 1 << 16;

int supported(int isa) {
    __builtin_cpu_init();
    if (isa == LB_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (isa == LB_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return isa == LB_SCALAR;
}

int best_isa() { return supported(LB_AVX512) ? LB_AVX512 : supported(LB_AVX2) ? LB_AVX2 : LB_SCALAR; }

int current = -1;

const lb_table* table() {
    if (current < 0) current = best_isa();
    return current == LB_AVX512 ? lb_table_avx512() : current == LB_AVX2 ? lb_table_avx2() : lb_table_scalar();
}

int64_t n_of(int family, const void* ws) {
    return family == LB_AFFINE ? ((const lb_affine*)ws)->n : ((const lb_ggml*)ws)->n;
}

int64_t k_of(int family, const void* ws) {
    return family == LB_AFFINE ? ((const lb_affine*)ws)->k : ((const lb_ggml*)ws)->k;
}

// Contiguous row ranges, one per thread, cut at multiples of 4 (the kernels' row blocking).
void split(int64_t n, int parts, int part, int64_t* r0, int64_t* r1) {
    int64_t quads = (n + 3) / 4, per = quads / parts, extra = quads % parts;
    int64_t q0 = part * per + (part < extra ? part : extra), q1 = q0 + per + (part < extra ? 1 : 0);
    *r0 = q0 * 4 < n ? q0 * 4 : n;
    *r1 = q1 * 4 < n ? q1 * 4 : n;
}

float round_bf16(float x) {  // nearest bfloat16, ties to even (finite values), as torch's .to(bfloat16)
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&x, &u, 4);
    return x;
}

int threads_for(int64_t weights) {   // one thread per PARALLEL_MIN_WEIGHTS weights, at most the pool's
    int64_t t = omp_get_max_threads(), by_size = weights / PARALLEL_MIN_WEIGHTS;
    return (int)(t < 1 || by_size < 1 ? 1 : by_size < t ? by_size : t);
}

}  // namespace

extern "C" {

LB_API int lb_abi_version(void) { return 1; }

LB_API int lb_isa_supported(int isa) { return supported(isa); }

LB_API int lb_get_isa(void) {
    table();
    return current;
}

// Choose the kernels' instruction set (-1: the best this CPU runs). Returns the one in use.
LB_API int lb_set_isa(int isa) {
    current = isa < 0 || !supported(isa) ? best_isa() : isa;
    return current;
}

LB_API int64_t lb_prep_stride(int family, const void* ws) { return table()->prep_stride(family, ws); }

LB_API void lb_prepare(int family, const void* ws, const float* x, int64_t m, float* out) {
    table()->prep(family, ws, x, m, out);
}

LB_API void lb_order(int family, const void* ws, int32_t* cols) { table()->order(family, ws, cols); }

// y [m, n] = x [m, k] W^T (+ bias [n]). round = LB_ROUND_BF16 is a bfloat16 matmul as torch computes it:
// x, each weight and the bias rounded to bfloat16, products summed in float32, the output rounded to
// bfloat16 (all held in floats). Returns 0, or -1 when memory runs out.
LB_API int lb_matmul(int family, const void* ws, const float* x, int64_t m, float* y, const float* bias, int round) {
    const lb_table* t = table();
    int64_t n = n_of(family, ws), k = k_of(family, ws);
    float* xp = (float*)malloc((m * t->prep_stride(family, ws) + (round ? m * k : 0)) * sizeof(float));
    if (!xp) return -1;
    if (round) {
        float* xr = xp + m * t->prep_stride(family, ws);
        for (int64_t i = 0; i < m * k; ++i) xr[i] = round_bf16(x[i]);
        x = xr;
    }
    t->prep(family, ws, x, m, xp);
    int threads = threads_for(n * k * (m < 4 ? m : 4));
    int64_t scratch = t->row_scratch(family, ws);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num();
        int64_t r0, r1;
        split(n, parts, part, &r0, &r1);
        float* s = (float*)malloc(scratch * sizeof(float));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        } else {
            if (r0 < r1) t->rows(family, ws, x, xp, m, y, n, r0, r1, round, s);
            free(s);
        }
    }
    free(xp);
    if (failed) return -1;
    if (bias)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t r = 0; r < n; ++r) y[i * n + r] += round ? round_bf16(bias[r]) : bias[r];
    if (round)
        for (int64_t i = 0; i < m * n; ++i) y[i] = round_bf16(y[i]);
    return 0;
}

// Rows [r0, r1) of the weight's exact values into out [r1 - r0, k], columns in prepared order.
LB_API void lb_decode(int family, const void* ws, int64_t r0, int64_t r1, float* out, int round) {
    const lb_table* t = table();
    int64_t k = k_of(family, ws);
    int threads = threads_for((r1 - r0) * k);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int parts = omp_get_num_threads(), part = omp_get_thread_num();
        int64_t a, b;
        split(r1 - r0, parts, part, &a, &b);
        if (a < b) t->decode(family, ws, r0 + a, r0 + b, out + a * k, round);
    }
}

}  // extern "C"
