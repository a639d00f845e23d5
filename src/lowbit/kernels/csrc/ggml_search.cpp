// The ggml scale searches of lowbit.weights.ggml.search, one sub-block at a time in C (OpenMP over
// sub-blocks). The same operations as the vectorised torch versions, in the same order per element
// (compiled with -ffp-contract=off); the sums over a sub-block's 16 or 32 elements run left to right, as
// llama.cpp's own loops do, where torch's reductions use several partial sums: a result can differ from
// the torch path only where two candidates' errors differ in the last bits.
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "lowbit_kernels.h"

namespace {

const float GROUP_MAX_EPS = 1e-15f;

inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

// The element of largest magnitude with its sign; the first one on ties (torch.argmax).
inline float signed_absmax(const float* x, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i)
        if (fabsf(x[i]) > fabsf(x[best])) best = i;
    return x[best];
}

float qkx_error(const float* x, const float* w, const float* l, int n, float scale, float mn, bool mad) {
    float e = 0.f;
    for (int i = 0; i < n; ++i) {
        float diff = scale * l[i] + mn - x[i];
        e += w[i] * (mad ? fabsf(diff) : diff * diff);
    }
    return e;
}

void qkx_one(const float* x, const float* w, int n, int nmax, float rmin, float rdelta, int nstep, bool mad,
             float* scale_out, float* min_out, int32_t* l_out) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < n; ++i) { mn = x[i] < mn ? x[i] : mn; mx = x[i] > mx ? x[i] : mx; }
    mn = mn > 0.f ? 0.f : mn;
    bool flat = mx == mn;
    float sum_w = 0.f, sum_x = 0.f;
    for (int i = 0; i < n; ++i) { sum_w += w[i]; sum_x += w[i] * x[i]; }
    float iscale = (float)nmax / (flat ? 1.f : mx - mn), scale = 1.f / iscale;
    float l[256], trial[256];
    for (int i = 0; i < n; ++i) l[i] = clampf(rintf(iscale * (x[i] - mn)), 0.f, (float)nmax);
    float best = qkx_error(x, w, l, n, scale, mn, mad);
    for (int k = 0; k <= nstep; ++k) {
        float span = mx - mn;
        float factor = ((rmin + rdelta * (float)k) + (float)nmax) / (span > 0.f ? span : 1.f);
        float sum_l = 0.f, sum_l2 = 0.f, sum_xl = 0.f;
        for (int i = 0; i < n; ++i) {
            trial[i] = clampf(rintf(factor * (x[i] - mn)), 0.f, (float)nmax);
            float wl = w[i] * trial[i];
            sum_l += wl;
            sum_l2 += wl * trial[i];
            sum_xl += wl * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        bool ok = det > 0.f && span > 0.f;
        det = ok ? det : 1.f;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0.f) {   // a positive min is not representable: refit the scale alone
            this_scale = sum_xl / (sum_l2 > 0.f ? sum_l2 : 1.f);
            this_min = 0.f;
        }
        float cur = qkx_error(x, w, trial, n, this_scale, this_min, mad);
        if (ok && cur < best) {
            for (int i = 0; i < n; ++i) l[i] = trial[i];
            best = cur;
            scale = this_scale;
            mn = this_min;
        }
    }
    *scale_out = flat ? 0.f : scale;
    *min_out = -mn;
    for (int i = 0; i < n; ++i) l_out[i] = flat ? 0 : (int32_t)l[i];
}

// Up to five passes moving one code at a time to maximise (sum w x l)^2 / sum w l^2.
void coordinate_descent(const float* x, const float* w, float* l, int n, float lo, float hi, float* sumlx,
                        float* suml2, bool need_sl2_positive) {
    for (int pass = 0; pass < 5; ++pass) {
        bool changed = false;
        for (int i = 0; i < n; ++i) {
            float slx = *sumlx - w[i] * x[i] * l[i], sl2 = *suml2 - w[i] * l[i] * l[i];
            bool ok = need_sl2_positive ? (slx > 0.f && sl2 > 0.f) : slx > 0.f;
            float new_l = clampf(rintf(x[i] * sl2 / (ok ? slx : 1.f)), lo, hi);
            float nslx = slx + w[i] * x[i] * new_l, nsl2 = sl2 + w[i] * new_l * new_l;
            if (ok && new_l != l[i] && nsl2 > 0.f && nslx * nslx * *suml2 > *sumlx * *sumlx * nsl2) {
                l[i] = new_l;
                *sumlx = nslx;
                *suml2 = nsl2;
                changed = true;
            }
        }
        if (!changed) break;
    }
}

inline float lsq_scale(float sumlx, float suml2) { return suml2 > 0.f ? sumlx / suml2 : 0.f; }

void qx_one(const float* x, const float* wgiven, int n, int nmax, float* scale_out, int32_t* l_out) {
    float w[256], wx[256], ls[256], best_l[256];
    for (int i = 0; i < n; ++i) { w[i] = wgiven ? wgiven[i] : x[i] * x[i]; wx[i] = w[i] * x[i]; }
    float mx = signed_absmax(x, n);
    bool zero = fabsf(mx) < GROUP_MAX_EPS;
    static const int steps[19] = {0, -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    float best_score = 0.f, best_lx = 0.f, best_l2 = 0.f;
    for (int s = 0; s < 19; ++s) {
        float iscale = -((float)nmax + 0.1f * (float)steps[s]) / (zero ? 1.f : mx);
        float sumlx = 0.f, suml2 = 0.f;
        for (int i = 0; i < n; ++i) {
            ls[i] = clampf(rintf(iscale * x[i]), (float)-nmax, (float)(nmax - 1));
            sumlx += ls[i] * wx[i];
            suml2 += ls[i] * ls[i] * w[i];
        }
        float score = suml2 > 0.f ? sumlx * sumlx / suml2 : -1.f;
        if (s == 0) score = score < 0.f ? 0.f : score;   // the first trial is kept even when it explains nothing
        if (s == 0 || score > best_score) {
            best_score = score;
            best_lx = sumlx;
            best_l2 = suml2;
            for (int i = 0; i < n; ++i) best_l[i] = ls[i];
        }
    }
    *scale_out = zero ? 0.f : lsq_scale(best_lx, best_l2);
    for (int i = 0; i < n; ++i) l_out[i] = zero ? -nmax : (int32_t)best_l[i];
}

void qp_one(const float* x, const float* w, int n, int nmax, float* scale_out, int32_t* l_out) {
    float mx = x[0];
    for (int i = 1; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    mx = mx < 0.f ? 0.f : mx;
    bool zero = mx < GROUP_MAX_EPS;
    mx = zero ? 1.f : mx;
    static const int steps[9] = {0, -4, -3, -2, -1, 1, 2, 3, 4};
    float l[256], ls[256], best_mse = 0.f;
    for (int s = 0; s < 9; ++s) {
        float iscale = (0.1f * (float)steps[s] + (float)nmax) / mx, inv = 1.f / iscale, mse = 0.f;
        for (int i = 0; i < n; ++i) {
            float q = rintf(iscale * x[i]);
            ls[i] = q > (float)nmax ? (float)nmax : q;
            float diff = x[i] - inv * ls[i];
            mse += w[i] * diff * diff;
        }
        if (s == 0 || mse < best_mse) {
            best_mse = mse;
            for (int i = 0; i < n; ++i) l[i] = ls[i];
        }
    }
    float sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) { sumlx += w[i] * x[i] * l[i]; suml2 += w[i] * l[i] * l[i]; }
    coordinate_descent(x, w, l, n, -(float)(1 << 30), (float)nmax, &sumlx, &suml2, true);
    *scale_out = zero ? 0.f : lsq_scale(sumlx, suml2);
    for (int i = 0; i < n; ++i) l_out[i] = zero || l[i] < 0.f ? 0 : (int32_t)l[i];
}

void q3_one(const float* x, int n, int nmax, float* scale_out, int32_t* l_out) {
    float w[256], l[256];
    float mx = signed_absmax(x, n);
    bool zero = fabsf(mx) < GROUP_MAX_EPS;
    float iscale = -(float)nmax / (zero ? 1.f : mx), sumlx = 0.f, suml2 = 0.f;
    for (int i = 0; i < n; ++i) {
        l[i] = clampf(rintf(iscale * x[i]), (float)-nmax, (float)(nmax - 1));
        w[i] = x[i] * x[i];
        sumlx += w[i] * x[i] * l[i];
        suml2 += w[i] * l[i] * l[i];
    }
    coordinate_descent(x, w, l, n, (float)-nmax, (float)(nmax - 1), &sumlx, &suml2, false);
    *scale_out = zero ? 0.f : lsq_scale(sumlx, suml2);
    for (int i = 0; i < n; ++i) l_out[i] = zero ? -nmax : (int32_t)l[i];
}

}  // namespace

extern "C" {

// x, w: [b, n] float32 (n <= 256); outputs per sub-block. Return -1 when n is out of range.
LB_API int lb_make_qkx(const float* x, const float* w, int64_t b, int n, int nmax, float rmin, float rdelta,
                       int nstep, int use_mad, float* scale, float* the_min, int32_t* l) {
    if (n < 1 || n > 256) return -1;
#pragma omp parallel for schedule(static) if (b * n >= 1 << 14)
    for (int64_t r = 0; r < b; ++r)
        qkx_one(x + r * n, w + r * n, n, nmax, rmin, rdelta, nstep, use_mad != 0, scale + r, the_min + r, l + r * n);
    return 0;
}

LB_API int lb_make_qx(const float* x, const float* w, int64_t b, int n, int nmax, float* scale, int32_t* l) {
    if (n < 1 || n > 256) return -1;
#pragma omp parallel for schedule(static) if (b * n >= 1 << 14)
    for (int64_t r = 0; r < b; ++r) qx_one(x + r * n, w ? w + r * n : nullptr, n, nmax, scale + r, l + r * n);
    return 0;
}

LB_API int lb_make_qp(const float* x, const float* w, int64_t b, int n, int nmax, float* scale, int32_t* l) {
    if (n < 1 || n > 256) return -1;
#pragma omp parallel for schedule(static) if (b * n >= 1 << 14)
    for (int64_t r = 0; r < b; ++r) qp_one(x + r * n, w + r * n, n, nmax, scale + r, l + r * n);
    return 0;
}

LB_API int lb_make_q3(const float* x, int64_t b, int n, int nmax, float* scale, int32_t* l) {
    if (n < 1 || n > 256) return -1;
#pragma omp parallel for schedule(static) if (b * n >= 1 << 14)
    for (int64_t r = 0; r < b; ++r) q3_one(x + r * n, n, nmax, scale + r, l + r * n);
    return 0;
}

}  // extern "C"
