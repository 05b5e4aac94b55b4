// Layer norm over the last dim, forward and backward with weight and bias gradients, for fp32 / fp16 / bf16 storage
// (input, weight and bias of one dtype) with fp32 arithmetic. Any hidden size: a block walks its row in strides.
//
// Forward, one block a row, three passes over the row (the second and third hit L2): the mean, then the variance
// as the mean of (x - mean)^2 (no cancellation, unlike E[x^2] - E[x]^2 when a channel is large), then
// y = (x - mean) * rstd * w + b; mean and rstd are kept.
// Backward, one block a row: dx = rstd * (w dy - (sum(w dy) + xhat sum(w dy xhat)) / hidden), xhat = (x - mean) rstd.
// The weight and bias gradients sum dy xhat and dy over rows: first partial sums over groups of rows for 32-column
// tiles (coalesced along the row), then a sum over the groups.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cuda_utils.cuh"
#include "kernels.h"

namespace megagpt {
namespace {

constexpr int kThreads = 256;
constexpr int kTileColumns = 32, kTileRows = 8;

template <typename T, int VEC>
__global__ void layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                          const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean_out,
                                          float* __restrict__ rstd_out, int64_t hidden, float eps) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  float sum = 0.0f;
  for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * VEC; j0 < hidden; j0 += kThreads * VEC) {
    float v[VEC];
    load_as_float<T, VEC>(xr + j0, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[i];
  }
  const float mean = group_reduce<kThreads>(sum, Sum(), scratch) / hidden;
  float sum_sq = 0.0f;
  for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * VEC; j0 < hidden; j0 += kThreads * VEC) {
    float v[VEC];
    load_as_float<T, VEC>(xr + j0, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(group_reduce<kThreads>(sum_sq, Sum(), scratch) / hidden + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * VEC; j0 < hidden; j0 += kThreads * VEC) {
    float v[VEC], w[VEC], b[VEC];
    load_as_float<T, VEC>(xr + j0, v);
    load_as_float<T, VEC>(weight + j0, w);
    load_as_float<T, VEC>(bias + j0, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = (v[i] - mean) * rstd * w[i] + b[i];
    store_from_float<T, VEC>(yr + j0, v);
  }
}

template <typename T, int VEC>
__global__ void layer_norm_input_grad_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                             const T* __restrict__ weight, const float* __restrict__ mean,
                                             const float* __restrict__ rstd, T* __restrict__ grad_x, int64_t hidden) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T *gr = grad_y + row * hidden, *xr = x + row * hidden;
  const float mu = mean[row], rs = rstd[row];
  float sum_wg = 0.0f, sum_wg_xhat = 0.0f;
  for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * VEC; j0 < hidden; j0 += kThreads * VEC) {
    float g[VEC], v[VEC], w[VEC];
    load_as_float<T, VEC>(gr + j0, g);
    load_as_float<T, VEC>(xr + j0, v);
    load_as_float<T, VEC>(weight + j0, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float wg = w[i] * g[i];
      sum_wg += wg;
      sum_wg_xhat += wg * (v[i] - mu) * rs;
    }
  }
  sum_wg = group_reduce<kThreads>(sum_wg, Sum(), scratch);
  sum_wg_xhat = group_reduce<kThreads>(sum_wg_xhat, Sum(), scratch);
  const float mean_wg = sum_wg / hidden, mean_wg_xhat = sum_wg_xhat / hidden;
  for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * VEC; j0 < hidden; j0 += kThreads * VEC) {
    float g[VEC], v[VEC], w[VEC];
    load_as_float<T, VEC>(gr + j0, g);
    load_as_float<T, VEC>(xr + j0, v);
    load_as_float<T, VEC>(weight + j0, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xhat = (v[i] - mu) * rs;
      g[i] = rs * (w[i] * g[i] - mean_wg - xhat * mean_wg_xhat);
    }
    store_from_float<T, VEC>(grad_x + row * hidden + j0, g);
  }
}

// Block (32, 8): column tile blockIdx.x, row group blockIdx.y; writes one partial sum per (group, column).
template <typename T>
__global__ void layer_norm_param_grad_partial_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                                     float* __restrict__ partial_w, float* __restrict__ partial_b,
                                                     int64_t rows, int64_t hidden, int64_t rows_per_group) {
  __shared__ float tile_w[kTileRows][kTileColumns + 1], tile_b[kTileRows][kTileColumns + 1];
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kTileColumns + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t last = first + rows_per_group < rows ? first + rows_per_group : rows;
  float acc_w = 0.0f, acc_b = 0.0f;
  if (column < hidden) {
    for (int64_t r = first + threadIdx.y; r < last; r += kTileRows) {
      const float g = to_float(grad_y[r * hidden + column]);
      acc_w += g * (to_float(x[r * hidden + column]) - mean[r]) * rstd[r];
      acc_b += g;
    }
  }
  tile_w[threadIdx.y][threadIdx.x] = acc_w;
  tile_b[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && column < hidden) {
    for (int i = 1; i < kTileRows; ++i) {
      acc_w += tile_w[i][threadIdx.x];
      acc_b += tile_b[i][threadIdx.x];
    }
    partial_w[blockIdx.y * hidden + column] = acc_w;
    partial_b[blockIdx.y * hidden + column] = acc_b;
  }
}

template <typename T>
__global__ void layer_norm_param_grad_final_kernel(const float* __restrict__ partial_w,
                                                   const float* __restrict__ partial_b, T* __restrict__ grad_weight,
                                                   T* __restrict__ grad_bias, int64_t groups, int64_t hidden) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= hidden) return;
  float w = 0.0f, b = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    w += partial_w[g * hidden + column];
    b += partial_b[g * hidden + column];
  }
  grad_weight[column] = from_float<T>(w);
  grad_bias[column] = from_float<T>(b);
}

bool grid_fits(int64_t rows) { return rows <= 0x7fffffff; }  // one block a row, at most 2^31 - 1 of them

int64_t row_groups(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(256, (rows + 31) / 32)); }

template <typename T, typename Launch>
cudaError_t with_vec(int64_t hidden, std::initializer_list<const void*> pointers, Launch&& launch) {
  bool vector = hidden % kVec16<T> == 0;
  for (const void* p : pointers) vector = vector && aligned16(p);
  if (vector) {
    launch(std::integral_constant<int, kVec16<T>>());
  } else {
    launch(std::integral_constant<int, 1>());
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                          int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (hidden < 1 || !grid_fits(rows)) return cudaErrorInvalidValue;
  return with_vec<T>(hidden, {x, weight, bias, y}, [&](auto vec) {
    layer_norm_forward_kernel<T, decltype(vec)::value><<<rows, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y),
        mean, rstd, hidden, eps);
  });
}

template <typename T>
cudaError_t backward_typed(const void* grad_y, const void* x, const void* weight, const float* mean,
                           const float* rstd, void* grad_x, void* grad_weight, void* grad_bias, float* workspace,
                           int64_t rows, int64_t hidden, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;  // the caller zeroes the parameter gradients of an empty input
  if (hidden < 1 || !grid_fits(rows)) return cudaErrorInvalidValue;
  const T *g = static_cast<const T*>(grad_y), *xs = static_cast<const T*>(x), *w = static_cast<const T*>(weight);
  cudaError_t status = with_vec<T>(hidden, {grad_y, x, weight, grad_x}, [&](auto vec) {
    layer_norm_input_grad_kernel<T, decltype(vec)::value>
        <<<rows, kThreads, 0, stream>>>(g, xs, w, mean, rstd, static_cast<T*>(grad_x), hidden);
  });
  if (status != cudaSuccess) return status;
  const int64_t groups = row_groups(rows), rows_per_group = (rows + groups - 1) / groups;
  float *partial_w = workspace, *partial_b = workspace + groups * hidden;
  const dim3 tiles((hidden + kTileColumns - 1) / kTileColumns, groups), threads(kTileColumns, kTileRows);
  layer_norm_param_grad_partial_kernel<T>
      <<<tiles, threads, 0, stream>>>(g, xs, mean, rstd, partial_w, partial_b, rows, hidden, rows_per_group);
  layer_norm_param_grad_final_kernel<T><<<(hidden + 255) / 256, 256, 0, stream>>>(
      partial_w, partial_b, static_cast<T*>(grad_weight), static_cast<T*>(grad_bias), groups, hidden);
  return cudaGetLastError();
}

}  // namespace

int64_t layer_norm_workspace_floats(int64_t rows, int64_t hidden) { return 2 * row_groups(rows) * hidden; }

cudaError_t layer_norm_forward(DType dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(x, weight, bias, y, mean, rstd, rows, hidden, eps, stream);
    case DType::kFloat16:
      return forward_typed<__half>(x, weight, bias, y, mean, rstd, rows, hidden, eps, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(x, weight, bias, y, mean, rstd, rows, hidden, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_backward(DType dtype, const void* grad_y, const void* x, const void* weight, const float* mean,
                                const float* rstd, void* grad_x, void* grad_weight, void* grad_bias, float* workspace,
                                int64_t rows, int64_t hidden, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad_y, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, workspace, rows,
                                   hidden, stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad_y, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, workspace, rows,
                                    hidden, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_y, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, workspace,
                                           rows, hidden, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megagpt
