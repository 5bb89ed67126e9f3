// The native ops' schemas: the same names and signatures as the Triton custom ops (kernels/*.py), in the
// namespace dearkd_fast_native (both libraries can be loaded in one process). The CPU kernels are
// registered beside their code (bn_stat.cpp, feature_align.cpp); autograd and fake (meta) rules in
// dearkd_fast/kernels/native.py, shared with the Triton ops.
#include <torch/library.h>

TORCH_LIBRARY(dearkd_fast_native, m) {
  m.def("bn_moments(Tensor[] xs) -> Tensor[]");
  m.def("bn_moments_backward(Tensor[] xs, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor[]");
  m.def("feature_align_loss(Tensor tokens, Tensor weight, Tensor? bias, Tensor target) -> Tensor");
  m.def("feature_align_loss_backward(Tensor grad, Tensor tokens, Tensor weight, Tensor? bias, Tensor target)"
        " -> (Tensor, Tensor, Tensor)");
}
