// The torch binding of the CUDA kernels: checks tensors, takes torch's current stream, calls kernels.h.
// Outputs are passed in (allocated by the Python caller), so tests can poison them before the call.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "kernels.h"

namespace {

megagpt::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return megagpt::DType::kFloat32;
    case at::kHalf:
      return megagpt::DType::kFloat16;
    case at::kBFloat16:
      return megagpt::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "megagpt kernels take float32, float16 or bfloat16 tensors, not ", t.scalar_type());
  }
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
}

void check_stats(const at::Tensor& t, const at::Tensor& x, int64_t rows, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device() && t.is_contiguous() && t.scalar_type() == at::kFloat &&
                  t.numel() == rows,
              name, " must be a contiguous float32 tensor on ", x.device(), " with one value per row (", rows, ")");
}

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

// scores (..., sq, sk) -> probs, same shape. mask: (b, 1 or heads, sq, sk) bool for 4-D scores (b, heads, sq, sk).
void softmax_forward(const at::Tensor& scores, at::Tensor& probs, double scale, bool causal, int64_t window,
                     const c10::optional<at::Tensor>& mask) {
  check_like(scores, scores, "scores");
  check_like(probs, scores, "probs");
  TORCH_CHECK(scores.dim() >= 2 && probs.sizes() == scores.sizes(), "probs must have the shape of scores");
  TORCH_CHECK(window == 0 || causal, "a window needs causal=True");
  megagpt::SoftmaxMask m;
  m.sq = scores.size(-2);
  m.sk = scores.size(-1);
  TORCH_CHECK(m.sk > 0 && m.sq > 0, "scores must have at least one query and one key");
  m.causal = causal;
  m.window = window;
  if (mask.has_value()) {
    const at::Tensor& t = *mask;
    TORCH_CHECK(scores.dim() == 4, "a mask needs scores of shape (batch, heads, sq, sk)");
    TORCH_CHECK(t.is_cuda() && t.device() == scores.device() && t.is_contiguous() && t.scalar_type() == at::kBool &&
                    t.dim() == 4,
                "mask must be a contiguous bool tensor (batch, 1 or heads, sq, sk) on ", scores.device());
    TORCH_CHECK(t.size(0) == scores.size(0) && (t.size(1) == 1 || t.size(1) == scores.size(1)) &&
                    t.size(2) == m.sq && t.size(3) == m.sk,
                "mask of shape ", t.sizes(), " does not fit scores of shape ", scores.sizes());
    m.mask = t.data_ptr<bool>();
    m.heads = scores.size(1);
    m.mask_heads = t.size(1);
  }
  TORCH_CHECK(m.sk <= megagpt::kMaxSoftmaxRow, "rows longer than ", megagpt::kMaxSoftmaxRow, " keys");
  const c10::cuda::CUDAGuard guard(scores.device());
  check_cuda(megagpt::scaled_masked_softmax_forward(dtype_of(scores), scores.data_ptr(), probs.data_ptr(),
                                                    scores.numel() / m.sk, m, static_cast<float>(scale),
                                                    c10::cuda::getCurrentCUDAStream()),
             "scaled_masked_softmax_forward");
}

void softmax_backward(const at::Tensor& grad_probs, const at::Tensor& probs, at::Tensor& grad_scores, double scale) {
  check_like(probs, probs, "probs");
  check_like(grad_probs, probs, "grad_probs");
  check_like(grad_scores, probs, "grad_scores");
  TORCH_CHECK(grad_probs.sizes() == probs.sizes() && grad_scores.sizes() == probs.sizes(), "shapes must match");
  TORCH_CHECK(probs.dim() >= 1 && probs.size(-1) > 0, "probs must have at least one key");
  const int64_t sk = probs.size(-1);
  TORCH_CHECK(sk <= megagpt::kMaxSoftmaxRow, "rows longer than ", megagpt::kMaxSoftmaxRow, " keys");
  const c10::cuda::CUDAGuard guard(probs.device());
  check_cuda(megagpt::scaled_masked_softmax_backward(dtype_of(probs), grad_probs.data_ptr(), probs.data_ptr(),
                                                     grad_scores.data_ptr(), probs.numel() / sk, sk,
                                                     static_cast<float>(scale), c10::cuda::getCurrentCUDAStream()),
             "scaled_masked_softmax_backward");
}

// x (..., hidden); weight, bias (hidden); mean, rstd float32 (rows).
void layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y,
                        at::Tensor& mean, at::Tensor& rstd, double eps) {
  check_like(x, x, "x");
  check_like(weight, x, "weight");
  check_like(bias, x, "bias");
  check_like(y, x, "y");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dim");
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  TORCH_CHECK(weight.numel() == hidden && bias.numel() == hidden && y.sizes() == x.sizes(), "shapes must match");
  check_stats(mean, x, rows, "mean");
  check_stats(rstd, x, rows, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(megagpt::layer_norm_forward(dtype_of(x), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                         mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, hidden,
                                         static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
             "layer_norm_forward");
}

void layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight,
                         at::Tensor& grad_bias) {
  check_like(x, x, "x");
  check_like(grad_y, x, "grad_y");
  check_like(weight, x, "weight");
  check_like(grad_x, x, "grad_x");
  check_like(grad_weight, x, "grad_weight");
  check_like(grad_bias, x, "grad_bias");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dim");
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_x.sizes() == x.sizes() && weight.numel() == hidden &&
                  grad_weight.numel() == hidden && grad_bias.numel() == hidden,
              "shapes must match");
  check_stats(mean, x, rows, "mean");
  check_stats(rstd, x, rows, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor workspace = at::empty({megagpt::layer_norm_workspace_floats(rows, hidden)}, x.options().dtype(at::kFloat));
  check_cuda(megagpt::layer_norm_backward(dtype_of(x), grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                          mean.data_ptr<float>(), rstd.data_ptr<float>(), grad_x.data_ptr(),
                                          grad_weight.data_ptr(), grad_bias.data_ptr(), workspace.data_ptr<float>(),
                                          rows, hidden, c10::cuda::getCurrentCUDAStream()),
             "layer_norm_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_forward", &softmax_forward, "scaled masked softmax forward into probs");
  m.def("softmax_backward", &softmax_backward, "scaled masked softmax backward into grad_scores");
  m.def("layer_norm_forward", &layer_norm_forward, "layer norm forward into y, mean, rstd");
  m.def("layer_norm_backward", &layer_norm_backward, "layer norm backward into grad_x, grad_weight, grad_bias");
  m.attr("max_softmax_row") = megagpt::kMaxSoftmaxRow;
}
