// Scaled masked softmax over the last dim, forward and backward: causal, causal band (a local window, no mask
// tensor), and boolean mask, for fp32 / fp16 / bf16 storage with fp32 arithmetic (Megatron's fused softmax, written
// anew, with the band that Megatron's kernels drop).
//
// A row of sk <= 16384 elements is held in registers, at most 32 per thread: rows up to 1024 take one warp, up to
// 4096 a block of 128 threads, up to 16384 a block of 512 (whose launch bounds cap a thread at 128 registers; the
// backward holds only the gradient and reads the probabilities again, from cache, to stay under that). Each thread reads VEC consecutive elements at a time
// (16-byte loads when the row length and pointers allow, else one element), so the data is read once and written
// once. A fully masked row's maximum is -inf; it is written as zeros instead of the NaN exp(-inf - -inf) would give.

#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "cuda_utils.cuh"
#include "kernels.h"

namespace megagpt {
namespace {

// In-row indices are int: a row has at most kMaxSoftmaxRow elements (fewer registers than int64 math).
struct RowMask {
  const SoftmaxMask& m;
  int64_t row;
  __device__ __forceinline__ int position() const { return static_cast<int>(row % m.sq + m.sk - m.sq); }
  __device__ __forceinline__ const bool* tensor_row() const {
    if (m.mask == nullptr) return nullptr;
    const int64_t slab = row / m.sq, i = row % m.sq;
    const int64_t batch = slab / m.heads, head = slab % m.heads;
    return m.mask + ((batch * m.mask_heads + head % m.mask_heads) * m.sq + i) * m.sk;
  }
};

// GROUP threads per row, each holding CHUNKS chunks of VEC elements: chunk c of thread t covers the elements
// [(c * GROUP + t) * VEC, ... + VEC), so a warp's loads are contiguous.
// GROUP == 32 runs 4 rows (warps) per block of 128 threads; larger groups run one row per block of GROUP threads.
// The launch bounds keep the 512-thread variants within a block's registers whatever the compiler's choice.
template <typename T, int VEC, int CHUNKS, int GROUP>
__global__ void __launch_bounds__(GROUP == 32 ? 128 : GROUP) softmax_forward_kernel(const T* __restrict__ scores, T* __restrict__ probs, int64_t rows,
                                       SoftmaxMask mask, float scale) {
  constexpr int ROWS_PER_BLOCK = GROUP == 32 ? 4 : 1;
  __shared__ float scratch[GROUP / 32];
  const int lane = GROUP == 32 ? threadIdx.x % 32 : threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS_PER_BLOCK + (GROUP == 32 ? threadIdx.x / 32 : 0);
  if (row >= rows) return;  // whole warps (or the whole block) leave together, so reductions stay complete
  const int sk = static_cast<int>(mask.sk), window = static_cast<int>(mask.window);
  const RowMask row_mask{mask, row};
  const int position = row_mask.position();
  const bool* mask_row = row_mask.tensor_row();
  const T* in = scores + row * sk;
  T* out = probs + row * sk;

  float x[CHUNKS][VEC];  // entries past the row end are set to -inf below, never read before
  float row_max = -INFINITY;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int j0 = (c * GROUP + lane) * VEC;
    if (j0 < sk) {
      load_as_float<T, VEC>(in + j0, x[c]);
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int j = j0 + v;
      bool hidden = j >= sk;
      if (!hidden && mask.causal) hidden = j > position || (window > 0 && j <= position - window);
      if (!hidden && mask_row != nullptr) hidden = mask_row[j];
      x[c][v] = hidden ? -INFINITY : x[c][v] * scale;
      row_max = fmaxf(row_max, x[c][v]);
    }
  }
  row_max = group_reduce<GROUP>(row_max, Max(), scratch);
  float row_sum = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      x[c][v] = row_max == -INFINITY ? 0.0f : __expf(x[c][v] - row_max);  // exp(-inf) = 0 for masked keys
      row_sum += x[c][v];
    }
  }
  row_sum = group_reduce<GROUP>(row_sum, Sum(), scratch);
  const float inverse = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int j0 = (c * GROUP + lane) * VEC;
    if (j0 < sk) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[c][v] *= inverse;
      store_from_float<T, VEC>(out + j0, x[c]);
    }
  }
}

template <typename T, int VEC, int CHUNKS, int GROUP>
__global__ void __launch_bounds__(GROUP == 32 ? 128 : GROUP) softmax_backward_kernel(const T* __restrict__ grad_probs, const T* __restrict__ probs,
                                        T* __restrict__ grad_scores, int64_t rows, int64_t row_length, float scale) {
  constexpr int ROWS_PER_BLOCK = GROUP == 32 ? 4 : 1;
  __shared__ float scratch[GROUP / 32];
  const int lane = GROUP == 32 ? threadIdx.x % 32 : threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS_PER_BLOCK + (GROUP == 32 ? threadIdx.x / 32 : 0);
  if (row >= rows) return;
  const int sk = static_cast<int>(row_length);
  grad_probs += row * row_length;
  probs += row * row_length;
  grad_scores += row * row_length;
  float g[CHUNKS][VEC];
  float dot = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int j0 = (c * GROUP + lane) * VEC;
    if (j0 < sk) {
      float p[VEC];
      load_as_float<T, VEC>(grad_probs + j0, g[c]);
      load_as_float<T, VEC>(probs + j0, p);
#pragma unroll
      for (int v = 0; v < VEC; ++v) dot += g[c][v] * p[v];
    }
  }
  dot = group_reduce<GROUP>(dot, Sum(), scratch);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int j0 = (c * GROUP + lane) * VEC;
    if (j0 < sk) {
      float p[VEC];
      load_as_float<T, VEC>(probs + j0, p);  // this thread read it a moment ago: a cache hit
#pragma unroll
      for (int v = 0; v < VEC; ++v) g[c][v] = scale * p[v] * (g[c][v] - dot);
      store_from_float<T, VEC>(grad_scores + j0, g[c]);
    }
  }
}

// The launch shape for a row length: the fewest threads that keep at most 32 elements each.
struct Shape {
  int group, chunks;
};

Shape shape_for(int64_t sk, int vec) {
  const int group = sk <= 1024 ? 32 : sk <= 4096 ? 128 : 512;
  const int64_t per_thread = (sk + static_cast<int64_t>(group) * vec - 1) / (static_cast<int64_t>(group) * vec);
  int chunks = 1;
  while (chunks < per_thread) chunks *= 2;
  return {group, chunks};
}

template <typename Launch>
cudaError_t dispatch(int64_t sk, int vec, Launch&& launch) {
  const Shape shape = shape_for(sk, vec);
  // Instantiate only the shapes shape_for can produce: at most 32 elements a thread.
#define MEGAGPT_SOFTMAX_CASE(G, C)                                                        \
  if (shape.group == G && shape.chunks == C) {                                            \
    const bool launched = launch(std::integral_constant<int, G>(), std::integral_constant<int, C>()); \
    return launched ? cudaGetLastError() : cudaErrorInvalidValue;                         \
  }
  MEGAGPT_SOFTMAX_CASE(32, 1)
  MEGAGPT_SOFTMAX_CASE(32, 2)
  MEGAGPT_SOFTMAX_CASE(32, 4)
  MEGAGPT_SOFTMAX_CASE(32, 8)
  MEGAGPT_SOFTMAX_CASE(32, 16)
  MEGAGPT_SOFTMAX_CASE(32, 32)
  MEGAGPT_SOFTMAX_CASE(128, 1)
  MEGAGPT_SOFTMAX_CASE(128, 2)
  MEGAGPT_SOFTMAX_CASE(128, 4)
  MEGAGPT_SOFTMAX_CASE(128, 8)
  MEGAGPT_SOFTMAX_CASE(128, 16)
  MEGAGPT_SOFTMAX_CASE(128, 32)
  MEGAGPT_SOFTMAX_CASE(512, 1)
  MEGAGPT_SOFTMAX_CASE(512, 2)
  MEGAGPT_SOFTMAX_CASE(512, 4)
  MEGAGPT_SOFTMAX_CASE(512, 8)
  MEGAGPT_SOFTMAX_CASE(512, 16)
  MEGAGPT_SOFTMAX_CASE(512, 32)
#undef MEGAGPT_SOFTMAX_CASE
  return cudaErrorInvalidValue;
}

// The (vec, chunks, group) triples shape_for can return: at most 32 elements a thread, and more than 8 when the
// group is a block (rows that short take a warp). Only these are compiled.
constexpr bool instantiated(int vec, int chunks, int group) {
  return vec * chunks <= 32 && (group == 32 || vec * chunks >= 16);
}

int64_t blocks_for(int64_t rows, int group) { return group == 32 ? (rows + 3) / 4 : rows; }

// A grid has at most 2^31 - 1 blocks in x; more rows than that are refused rather than silently cut.
bool grid_fits(int64_t rows, int group) { return blocks_for(rows, group) <= 0x7fffffff; }

template <typename T>
cudaError_t forward_typed(const void* scores, void* probs, int64_t rows, const SoftmaxMask& mask, float scale,
                          cudaStream_t stream) {
  const T* in = static_cast<const T*>(scores);
  T* out = static_cast<T*>(probs);
  if (rows == 0) return cudaSuccess;
  if (mask.sk > kMaxSoftmaxRow || mask.sk < 1 || !grid_fits(rows, shape_for(mask.sk, 1).group)) {
    return cudaErrorInvalidValue;
  }
  const bool vector = mask.sk % kVec16<T> == 0 && aligned16(in) && aligned16(out);
  auto run = [&](auto vec) {
    return dispatch(mask.sk, vec.value, [&](auto group, auto chunks) {
      constexpr int V = decltype(vec)::value, G = decltype(group)::value, C = decltype(chunks)::value;
      if constexpr (instantiated(V, C, G)) {
        softmax_forward_kernel<T, V, C, G>
            <<<blocks_for(rows, G), G == 32 ? 128 : G, 0, stream>>>(in, out, rows, mask, scale);
        return true;
      } else {
        return false;  // shape_for never asks for this shape
      }
    });
  };
  return vector ? run(std::integral_constant<int, kVec16<T>>()) : run(std::integral_constant<int, 1>());
}

template <typename T>
cudaError_t backward_typed(const void* grad_probs, const void* probs, void* grad_scores, int64_t rows, int64_t sk,
                           float scale, cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad_probs);
  const T* p = static_cast<const T*>(probs);
  T* out = static_cast<T*>(grad_scores);
  if (rows == 0) return cudaSuccess;
  if (sk > kMaxSoftmaxRow || sk < 1 || !grid_fits(rows, shape_for(sk, 1).group)) return cudaErrorInvalidValue;
  const bool vector = sk % kVec16<T> == 0 && aligned16(g) && aligned16(p) && aligned16(out);
  auto run = [&](auto vec) {
    return dispatch(sk, vec.value, [&](auto group, auto chunks) {
      constexpr int V = decltype(vec)::value, G = decltype(group)::value, C = decltype(chunks)::value;
      if constexpr (instantiated(V, C, G)) {
        softmax_backward_kernel<T, V, C, G>
            <<<blocks_for(rows, G), G == 32 ? 128 : G, 0, stream>>>(g, p, out, rows, sk, scale);
        return true;
      } else {
        return false;  // shape_for never asks for this shape
      }
    });
  };
  return vector ? run(std::integral_constant<int, kVec16<T>>()) : run(std::integral_constant<int, 1>());
}

}  // namespace

cudaError_t scaled_masked_softmax_forward(DType dtype, const void* scores, void* probs, int64_t rows,
                                          const SoftmaxMask& mask, float scale, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(scores, probs, rows, mask, scale, stream);
    case DType::kFloat16:
      return forward_typed<__half>(scores, probs, rows, mask, scale, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(scores, probs, rows, mask, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t scaled_masked_softmax_backward(DType dtype, const void* grad_probs, const void* probs, void* grad_scores,
                                           int64_t rows, int64_t sk, float scale, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad_probs, probs, grad_scores, rows, sk, scale, stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad_probs, probs, grad_scores, rows, sk, scale, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_probs, probs, grad_scores, rows, sk, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megagpt
