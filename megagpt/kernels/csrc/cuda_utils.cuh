// Device helpers shared by the kernels: storage dtypes to and from fp32, 16-byte vector loads, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace megagpt {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

// Load / store VEC consecutive elements as fp32; VEC is 1 or kVec16<T> (then the address is 16-byte aligned).
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* src, float* dst) {
  if constexpr (VEC == 1) {
    dst[0] = to_float(src[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    union {
      uint4 raw;
      T items[VEC];
    } pack;
    pack.raw = *reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = to_float(pack.items[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* dst, const float* src) {
  if constexpr (VEC == 1) {
    dst[0] = from_float<T>(src[0]);
  } else {
    union {
      uint4 raw;
      T items[VEC];
    } pack;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pack.items[i] = from_float<T>(src[i]);
    *reinterpret_cast<uint4*>(dst) = pack.raw;
  }
}

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ static float identity() { return 0.0f; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ static float identity() { return -INFINITY; }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

// Reduce over the GROUP threads that share a row: a warp (GROUP == 32) or the whole block, through `scratch`
// (GROUP / 32 floats of shared memory). Every thread of the group gets the result.
template <int GROUP, typename Op>
__device__ __forceinline__ float group_reduce(float x, Op op, float* scratch) {
  x = warp_reduce(x, op);
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read by the previous reduction
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < GROUP / 32 ? scratch[lane] : Op::identity();
    x = warp_reduce(x, op);
  }
  return x;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace megagpt
