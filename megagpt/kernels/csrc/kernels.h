// The CUDA kernels' C++ interface: raw pointers and a stream, no torch, so every .cu compiles with plain nvcc.
// The torch binding (binding.cpp) checks tensors and calls these. Arithmetic is fp32 whatever the storage dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace megagpt {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows of scores are laid out as (slabs, sq, sk), a slab being one (batch, head). Query row i of a slab sits at key
// position i + sk - sq (so sq == sk is the square causal case). Key j is masked when
//   causal and j > position, or
//   window > 0 and j <= position - window (a causal band of `window` keys), or
//   mask != nullptr and mask[((batch * mask_heads + head % mask_heads) * sq + i) * sk + j] (true = masked),
// with batch = slab / heads and head = slab % heads; mask_heads is 1 (broadcast over heads) or heads.
struct SoftmaxMask {
  int64_t sq = 1, sk = 1;
  bool causal = false;
  int64_t window = 0;
  const bool* mask = nullptr;
  int64_t heads = 1, mask_heads = 1;
};

// Longest row the softmax kernels take; longer rows are for the torch path.
constexpr int64_t kMaxSoftmaxRow = 16384;

// probs = softmax(scale * scores) over each row with masked keys excluded; a row with every key masked gives zeros.
cudaError_t scaled_masked_softmax_forward(DType dtype, const void* scores, void* probs, int64_t rows,
                                          const SoftmaxMask& mask, float scale, cudaStream_t stream);

// grad_scores = scale * probs * (grad_probs - rowsum(grad_probs * probs)); masked keys have probs 0, so grad 0.
cudaError_t scaled_masked_softmax_backward(DType dtype, const void* grad_probs, const void* probs, void* grad_scores,
                                           int64_t rows, int64_t sk, float scale, cudaStream_t stream);

// y = (x - mean) * rstd * weight + bias over each row of `hidden`; mean and rstd (fp32, one per row) are kept for
// the backward. Any hidden size.
cudaError_t layer_norm_forward(DType dtype, const void* x, const void* weight, const void* bias, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t hidden, float eps, cudaStream_t stream);

// grad_x for every row, and grad_weight, grad_bias summed over rows. `workspace` holds
// layer_norm_workspace_floats(rows, hidden) floats for the column partial sums.
int64_t layer_norm_workspace_floats(int64_t rows, int64_t hidden);
cudaError_t layer_norm_backward(DType dtype, const void* grad_y, const void* x, const void* weight, const float* mean,
                                const float* rstd, void* grad_x, void* grad_weight, void* grad_bias, float* workspace,
                                int64_t rows, int64_t hidden, cudaStream_t stream);

}  // namespace megagpt
