// The per-row loops of the blockwise contrastive pass (csrc/cpu/infonce.cpp; math in its header
// comment), included once per vector ISA level by csrc/cpu/infonce_rows.cpp, each time inside
// the namespace sslops::SSLOPS_ROWS_NS under that level's `#pragma GCC target`. No include
// guard (included three times) and no includes (the includer brings <algorithm>, <cmath>,
// <cstring>, <limits>, <cstdint> first, outside the target pragma).
//
// Every loop is branch-free with `omp simd`, and exp_ps/log1p_unit_ps are polynomial, so GCC
// vectorises each at every level (checked: `objdump -d` shows ymm at avx2 and zmm at avx512).

namespace sslops {
namespace SSLOPS_ROWS_NS {
namespace {

// exp in fp32 without a libm call, so `omp simd` loops vectorise: x = n·ln2 + r with
// |r| <= ln2/2 (Cody–Waite split of ln2), exp(r) by its degree-7 Taylor polynomial
// (relative error < 1e-8, below fp32 rounding), 2^n from the exponent bits. n is rounded to
// nearest by adding 1.5·2^23 (the sum's low mantissa bits are n): pure float and bit
// operations, which GCC vectorises at every ISA level (a float→int truncation with a floor
// correction only vectorised for SSE2 and stayed scalar under AVX2/AVX-512). Below −87 it
// returns 0 (this covers −inf); NaN stays NaN.
inline float exp_ps(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: y + kRound has n in its low mantissa bits
  const float yr = xc * 1.44269504088896341f + kRound;
  const float fn = yr - kRound;  // round(xc·log2 e), |fn| <= 127
  int32_t n;
  std::memcpy(&n, &yr, sizeof(n));
  n -= 0x4B400000;  // the bits of kRound
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float e = p * scale;
  e = x < -87.0f ? 0.0f : e;
  e = x > 88.0f ? std::numeric_limits<float>::infinity() : e;
  return x != x ? x : e;
}
inline double exp_ps(double x) { return std::exp(x); }

// log(1 + u) for u in [0, 1] in fp32 without a libm call: 2·atanh(r), r = u/(2 + u) <= 1/3,
// by its odd series to r¹⁵ (truncation < 2e-9 relative, below fp32 rounding; exact as u → 0).
inline float log1p_unit_ps(float u) {
  const float r = u / (2.0f + u), r2 = r * r;
  float p = 1.0f / 15.0f;
  p = p * r2 + 1.0f / 13.0f;
  p = p * r2 + 1.0f / 11.0f;
  p = p * r2 + 1.0f / 9.0f;
  p = p * r2 + 1.0f / 7.0f;
  p = p * r2 + 1.0f / 5.0f;
  p = p * r2 + 1.0f / 3.0f;
  p = p * r2 + 1.0f;
  return 2.0f * r * p;
}
inline double log1p_unit_ps(double u) { return std::log1p(u); }

// t·s rounded to acc, as the forward stored it, also where the compiler fuses multiply-adds
// (GCC does across expressions): the backward's t·s_ij − lse_i is exact at the row's maximum
// only if it rounds t·s_ij as the forward did (fused, the small-τ NT-Xent gradient was 3.6×
// farther from float64 than lightly's). GCC may not drop the + 0 (it turns −0 into +0), so the
// product can only fuse with it, fma(s, t, 0), which rounds once: to fl(s·t).
template <typename acc>
inline acc stored_logit(acc s, acc t) {
  return s * t + acc(0);
}

// xr[j] <- t·s_j for the in-batch columns [0, ib) when keep_neg (the caller then marks the CSR
// positives), −inf otherwise; the negatives' columns [ib, bc) always t·s_j.
template <typename acc>
void masked_logits(const acc* s, acc* xr, acc t, bool keep_neg, int64_t ib, int64_t bc) {
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < ib; ++j) xr[j] = keep_neg ? s[j] * t : neg_inf;
#pragma omp simd
  for (int64_t j = ib; j < bc; ++j) xr[j] = s[j] * t;
}

template <typename acc>
acc span_max(const acc* x, int64_t n) {
  acc m = -std::numeric_limits<acc>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Σ exp(xr_j − mx) over the terms below the maximum, the count of terms at it (each exactly 1)
// and Σ exp(xr_j − mx)·s_j over [0, n). The terms at the maximum are kept out of the sum so
// that the caller adds them last: one rounding near 1 instead of one per later small term (a
// dominant positive's 1 − p is that sum: naive PyTorch's error, not a multiple of it).
template <typename acc>
void span_exp_sums(const acc* xr, const acc* s, acc mx, int64_t n, acc& sum_out, acc& top_out,
                   acc& ms_out) {
  acc sum = 0, top = 0, ms = 0;
#pragma omp simd reduction(+ : sum, top, ms)
  for (int64_t j = 0; j < n; ++j) {
    const acc e = exp_ps(xr[j] - mx);
    const bool at_max = xr[j] == mx;
    sum += at_max ? acc(0) : e;
    top += at_max ? acc(1) : acc(0);
    ms += e * s[j];
  }
  sum_out += sum;
  top_out += top;
  ms_out += ms;
}

// Labelled in-batch columns [j0, j1) in one pass: xr_j = t·s_j where the column is in the
// denominator (j ∈ P(i) ? keep_pos : keep_neg), −inf elsewhere; the positives' Σ s, count and
// (weighted) Σ s·e^{s/σ}, Σ e^{s/σ} into pos4; returns max_j xr_j.
template <typename acc, bool WEIGHTED>
acc span_logits_positives(const acc* s, acc* xr, const int32_t* lab, int32_t li, bool keep_pos,
                          bool keep_neg, acc t, acc inv_sigma, int64_t j0, int64_t j1, acc* pos4) {
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const int kp = keep_pos, kn = keep_neg;
  acc m = neg_inf, p = 0, n = 0, pse = 0, pe = 0;
#pragma omp simd reduction(max : m) reduction(+ : p, n, pse, pe)
  for (int64_t j = j0; j < j1; ++j) {
    const int g = lab[j] == li;
    const int keep = (g & kp) | ((g ^ 1) & kn);
    const acc xv = keep ? s[j] * t : neg_inf;
    xr[j] = xv;
    m = std::max(m, xv);
    const acc gf = static_cast<acc>(g);
    p += gf * s[j];
    n += gf;
    if constexpr (WEIGHTED) {
      const acc e = exp_ps(s[j] * inv_sigma);
      pse += gf * s[j] * e;
      pe += gf * e;
    }
  }
  pos4[0] += p;
  pos4[1] += n;
  pos4[2] += pse;
  pos4[3] += pe;
  return m;
}

// The negatives' columns [j0, j1): xr_j = t·s_j; returns their max.
template <typename acc>
acc span_logits(const acc* s, acc* xr, acc t, int64_t j0, int64_t j1) {
  acc m = -std::numeric_limits<acc>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = j0; j < j1; ++j) {
    xr[j] = s[j] * t;
    m = std::max(m, xr[j]);
  }
  return m;
}

// SigLIP over [0, n): Σ softplus(−y x), Σ h·s, Σ h, #positives with x = t·s + b,
// y = lab[j] == li ? +1 : −1, h = −y·σ(−y x). Stable for any x: softplus(v) = max(v, 0) +
// log1p(e^{−|v|}), σ from the same e^{−|v|}.
template <typename acc>
void span_sigmoid(const acc* s, const int32_t* lab, int32_t li, acc t, acc b, int64_t n,
                  acc* out4) {
  acc sp = 0, hs = 0, hsum = 0, cnt = 0;
#pragma omp simd reduction(+ : sp, hs, hsum, cnt)
  for (int64_t j = 0; j < n; ++j) {
    const bool pos = lab[j] == li;
    const acc x = s[j] * t + b;
    const acc v = pos ? -x : x;  // −y·x
    const acc u = exp_ps(-std::abs(v));
    const acc sig = (v >= acc(0) ? acc(1) : u) / (acc(1) + u);  // σ(v)
    sp += std::max(v, acc(0)) + log1p_unit_ps(u);
    const acc h = pos ? -sig : sig;
    hs += h * s[j];
    hsum += h;
    cnt += pos ? acc(1) : acc(0);
  }
  out4[0] += sp;
  out4[1] += hs;
  out4[2] += hsum;
  out4[3] += cnt;
}

// Row r of a tile, in place: s_j <- D_rj = C_rj + C_jr (both directions), the in-batch block
// by the relation, the negatives' columns (and rows_extra) with no relation. Branch-free (so
// that the loops vectorise): the exponents are clamped at 0, which changes nothing inside the
// denominator (x <= LSE there) and keeps exp finite outside it, where the 0/1 factor `keep`
// then zeroes the term (a product with an overflowed exp would be 0·inf = NaN).
template <typename acc, bool WEIGHTED>
void coef_row_softmax(acc* s, const int32_t* lab, int32_t li, bool keep_pos, bool keep_neg, acc t,
                      acc inv_sigma, acc ar, acc lr, acc lor, acc gpr, acc gqr, const acc* ac,
                      const acc* lc, const acc* loc, const acc* gpc, const acc* gqc, int64_t ib,
                      int64_t bc, const acc* keep_buf, bool rows_extra) {
  const acc zero = 0;
  if (lab) {
    const int kp = keep_pos, kn = keep_neg;
#pragma omp simd
    for (int64_t j = 0; j < ib; ++j) {
      const int g = lab[j] == li;
      const acc keep = static_cast<acc>((g & kp) | ((g ^ 1) & kn));
      const acc x = stored_logit(s[j], t);
      acc d = keep * t * (ar * exp_ps(std::min((x - lr) - lor, zero)) + ac[j] * exp_ps(std::min((x - lc[j]) - loc[j], zero)));
      acc pair = gpr + gpc[j];
      if constexpr (WEIGHTED) pair += (gqr + gqc[j]) * exp_ps(s[j] * inv_sigma);
      s[j] = d + static_cast<acc>(g) * pair;
    }
  } else {  // keep_buf[j] = 1 where column j is in the denominator (CSR rows: set by the caller)
#pragma omp simd
    for (int64_t j = 0; j < ib; ++j) {
      const acc x = stored_logit(s[j], t);
      s[j] = keep_buf[j] * t * (ar * exp_ps(std::min((x - lr) - lor, zero)) + ac[j] * exp_ps(std::min((x - lc[j]) - loc[j], zero)));
    }
  }
  // Columns [ib, bc) relate to no row: either they are the negatives (never anchors: only the
  // row's own term) or, over the negatives' rows (rows_extra: ib = 0), they are the anchors
  // (only the column's term). One exponential each.
  if (rows_extra) {
#pragma omp simd
    for (int64_t j = ib; j < bc; ++j) s[j] = t * ac[j] * exp_ps(std::min((stored_logit(s[j], t) - lc[j]) - loc[j], zero));
  } else {
#pragma omp simd
    for (int64_t j = ib; j < bc; ++j) s[j] = t * ar * exp_ps(std::min((stored_logit(s[j], t) - lr) - lor, zero));
  }
}

template <typename acc>
void coef_row_sigmoid(acc* s, const int32_t* lab, int32_t li, acc t, acc b, acc ar,
                      const acc* ac, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool pos = lab[j] == li;
    const acc x = s[j] * t + b;
    const acc v = pos ? -x : x;
    const acc u = exp_ps(-std::abs(v));
    const acc sig = (v >= acc(0) ? acc(1) : u) / (acc(1) + u);
    s[j] = (ar + ac[j]) * t * (pos ? -sig : sig);
  }
}

}  // namespace
}  // namespace SSLOPS_ROWS_NS
}  // namespace sslops
