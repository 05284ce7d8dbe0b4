// Per-element quantization math shared by the C++ (CPU) and CUDA kernels: PyTorch's
// quantization arithmetic and MinMaxObserver's formulas, bit for bit. The formulas and
// what would break their exactness: docs/kernels.md, "Exactness".
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FEDHQ_HD __host__ __device__ __forceinline__
#else
#define FEDHQ_HD inline
#endif

namespace fedhq {

// ---- 16-bit float storage types (bit patterns; converted with round-half-even) ----
// On the device the conversions are the hardware's (cvt.rn: the same IEEE function as
// the host's bit manipulation, in one instruction); NaN is mapped as on the host.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// std::bit_cast (C++20); a 4-byte memcpy compiles to a register move, host and device.
template <class To, class From>
FEDHQ_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}

FEDHQ_HD uint32_t float_bits(float f) { return bit_cast<uint32_t>(f); }

FEDHQ_HD float bits_float(uint32_t u) { return bit_cast<float>(u); }

FEDHQ_HD float to_float(float v) { return v; }

FEDHQ_HD float to_float(bf16_t v) { return bits_float(uint32_t(v.bits) << 16); }

FEDHQ_HD float to_float(half_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float32
    return bits_float(sign | float_bits(float(mantissa) * 5.9604644775390625e-8f));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <typename T> FEDHQ_HD T from_float(float f);

template <> FEDHQ_HD float from_float<float>(float f) { return f; }

template <> FEDHQ_HD bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
#if defined(__CUDA_ARCH__)
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  u += 0x7fffu + ((u >> 16) & 1u);  // round half to even on the 16 dropped bits
  return bf16_t{uint16_t(u >> 16)};
#endif
}

template <> FEDHQ_HD half_t from_float<half_t>(float f) {
  uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};  // NaN
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(f))};
#else
  if (u >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (u < 0x38800000u) {
    // Below half's smallest normal (2^-14): adding 0.5f puts the value on a grid of
    // 2^-24, half's subnormal step, and the float add rounds half to even for us.
    const float shifted = bits_float(u) + 0.5f;
    return half_t{uint16_t(sign | (float_bits(shifted) - 0x3f000000u))};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits half to even.
  u += 0xc8000fffu + ((u >> 13) & 1u);
  return half_t{uint16_t(sign | (u >> 13))};
#endif
}

// ---- exact arithmetic helpers ----
// An unfused multiply: nvcc contracts a*b+c into an FMA by default, which changes
// the rounding of `x * inv_scale` before the round-half-even step.
FEDHQ_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FEDHQ_HD float max_f(float a, float b) { return a > b ? a : b; }  // NaN in `a` -> b
FEDHQ_HD float min_f(float a, float b) { return a < b ? a : b; }  // NaN in `a` -> b

// Round half to even, as std::nearbyint / torch.round. Exact for |v| < 2^22:
// adding 1.5 * 2^23 leaves no fraction bits, so the add itself rounds.
FEDHQ_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  const float magic = 12582912.0f;
  return (v + magic) - magic;
#endif
}

// Quantization parameters of one segment (a whole tensor or one channel), in the
// float form the per-element math needs.
struct QParams {
  float scale;
  float inv_scale;   // 1.0f / scale, computed once as PyTorch does
  float zero_point;  // integer-valued
  float qmin;
  float qmax;
};

FEDHQ_HD QParams make_qparams(float scale, int32_t zero_point, int32_t qmin, int32_t qmax) {
  return QParams{scale, 1.0f / scale, float(zero_point), float(qmin), float(qmax)};
}

// The integer code zero_point + round(x / scale), before clamping. It is saturated to
// [qmin - 1, qmax + 1] first so the rounding trick stays exact and a NaN input lands
// below the range (code qmin - 1: masked, dequantizes to qmin), as PyTorch does on x86.
FEDHQ_HD float unclamped_code(float x, const QParams& p) {
  float v = mul_rn(x, p.inv_scale);
  v = max_f(v, p.qmin - p.zero_point - 1.0f);
  v = min_f(v, p.qmax - p.zero_point + 1.0f);
  return round_half_even(v) + p.zero_point;
}

FEDHQ_HD float clamp_code(float code, const QParams& p) { return min_f(max_f(code, p.qmin), p.qmax); }

// STE mask: 1 where the code was inside [qmin, qmax] before clamping.
FEDHQ_HD bool in_range(float code, const QParams& p) { return code >= p.qmin && code <= p.qmax; }

FEDHQ_HD float dequantize_code(float code, const QParams& p) { return mul_rn(code - p.zero_point, p.scale); }

FEDHQ_HD float fake_quant_value(float x, const QParams& p) {
  return dequantize_code(clamp_code(unclamped_code(x, p), p), p);
}

FEDHQ_HD int8_t quantize_value(float x, const QParams& p) {
  return int8_t(clamp_code(unclamped_code(x, p), p));
}

// float32 machine epsilon: MinMaxObserver's lower bound on the scale.
constexpr float kScaleEps = 1.1920928955078125e-07f;
// float32's largest finite value: the upper bound on an affine scale.
constexpr float kScaleMax = 3.4028234663852886e+38f;

// MinMaxObserver / PerChannelMinMaxObserver: scale and zero point from an observed
// [lo, hi] range (the range is first widened to include 0). Symmetric ranges need
// qmin < 0 < qmax and give zero point 0. An affine range wider than float32's max
// (hi' - lo' overflows) is divided piecewise and the scale capped at kScaleMax.
FEDHQ_HD void qparams_from_range(float lo, float hi, bool symmetric, int32_t qmin, int32_t qmax,
                                 float* scale, int32_t* zero_point) {
  const float lo_neg = min_f(lo, 0.0f);
  const float hi_pos = max_f(hi, 0.0f);
  if (symmetric) {
    const float magnitude = max_f(-lo_neg, hi_pos);
    *scale = max_f(magnitude / (float(qmax - qmin) / 2.0f), kScaleEps);
    *zero_point = 0;
  } else {
    const float span = float(qmax - qmin), width = hi_pos - lo_neg;
    const float wide = width > kScaleMax ? hi_pos / span - lo_neg / span : width / span;
    const float s = min_f(max_f(wide, kScaleEps), kScaleMax);
    const float zp = float(qmin) - round_half_even(lo_neg / s);
    *scale = s;
    *zero_point = int32_t(min_f(max_f(zp, float(qmin)), float(qmax)));
  }
}

}  // namespace fedhq
