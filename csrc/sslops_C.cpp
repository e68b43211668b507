// The extension sslops._C: every op schema of the `sslops` namespace, declared once.
//
// Kernels register their implementations elsewhere, one file per loss family:
//   csrc/cpu/<stem>.cpp   TORCH_LIBRARY_IMPL(sslops, CPU, m)
//   csrc/cuda/<stem>.cu   TORCH_LIBRARY_IMPL(sslops, CUDA, m)
// C++ ops carry the suffix `_cxx`; the Python custom ops of sslops/ops/ (which add the
// fake and autograd registrations and the backend choice) wrap them.
//
// No pybind11 and no torch/extension.h anywhere in csrc/: the ops reach Python through the
// dispatcher (torch.ops.sslops), and the module below uses only the Python limited API
// (Py_LIMITED_API, set by setup.py), so one _C.abi3.so loads on every CPython >= 3.10 with
// the torch it was built against (a build made with Python 3.11 runs on a 3.12 machine).
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"

TORCH_LIBRARY(sslops, m) {
  // ---- column statistics (csrc/cpu/column_moments.cpp, csrc/cuda/column_moments.cu)
  // mean_k = Σ_n z_nk / N,  m2_k = Σ_n (z_nk - mean_k)², accumulated in fp32 (fp64 for fp64).
  m.def("column_moments_cxx(Tensor z) -> (Tensor mean, Tensor m2)");

  // ---- covariance family: VICReg, VICReg relation, Barlow Twins
  // (csrc/cpu/covariance.cpp, csrc/cuda/covariance.cu; wrapped by sslops/ops/covariance.py)
  // route: 0 = by shape, 1 = K×K product, 2 = N×N Gram product. Outputs in fp32 (fp64 for fp64).
  // VICReg, one view: terms = [Σ_k relu(1 - sqrt(var_k + eps)), Σ_{j≠k} Cov_jk², Σ (z - other)²], mean, m2;
  // the invariance sum is taken in the pass that computes the column means (0 when other is None).
  m.def("vicreg_view_forward_cxx(Tensor z, Tensor? other, float eps, int route, bool save) -> (Tensor terms, Tensor mean, Tensor m2, Tensor prod)");
  // save: also return the product the backward needs (prod: N×N Gram on route 2, K×K covariance
  // on route 1; (0, 0) when not saved, the backward then recomputes it).
  // dz = coef[0]·∂terms[0] + coef[1]·∂terms[1] + coef[2]·(z - other)   (other may be None)
  m.def("vicreg_view_backward_cxx(Tensor z, Tensor? other, Tensor mean, Tensor m2, Tensor prod, Tensor coef, float eps, int route) -> Tensor");
  // Barlow Twins loss, the batch-norm statistics of both views, and the saved products
  // (Gram route: ÂÂᵀ, B̂B̂ᵀ; K×K route: c = ÂᵀB̂ and an empty tensor).
  m.def("barlow_twins_forward_cxx(Tensor z_a, Tensor z_b, float lambd, float eps, int route, bool save) -> (Tensor loss, Tensor mean_a, Tensor rstd_a, Tensor mean_b, Tensor rstd_b, Tensor prod_a, Tensor prod_b)");
  m.def("barlow_twins_backward_cxx(Tensor grad, Tensor z_a, Tensor z_b, Tensor mean_a, Tensor rstd_a, Tensor mean_b, Tensor rstd_b, Tensor prod_a, Tensor prod_b, float lambd, int route) -> (Tensor, Tensor)");

  // ---- the blockwise contrastive pass: InfoNCE/SupCon, queues, DCL, CLIP, SigLIP (issues 4, 13)
  // (csrc/cpu/infonce.cpp, csrc/cuda/infonce.cu; wrapped by sslops/ops/infonce.py, math there.)
  // Square form (y = None): anchors rows [x_start, x_end) of x (N, K) against x's rows (labels
  // (N,) or a symmetric CSR crow (N+1), col sorted per row, duplicates and self-pairs skipped)
  // and the extra negatives (M, K). Two-set form: rows [x_start, x_end) of x against y, and with
  // BIDIR (flags & 32) rows [y_start, y_end) of y against x; labels for both sets.
  // flags: 1 sigmoid (SigLIP), 2 no in-batch negatives, 4 decoupled, 8 DCLW weights, 16 no
  // normalisation, 32 both directions. scale, bias: 0-d tensors. Forward per anchor row, fp32
  // (fp64 for fp64): diff = [lse, Σ_P s, Σ_P s·e^{s/σ}] (sigmoid: [Σ softplus(−y x), 0, 0]) and
  // aux = [|P|, Σ p·s, Σ_P e^{s/σ}, lse's rounding residual] (sigmoid: [|P|, Σ h·s, Σ h, 0]).
  // Backward: the gradients of the diff columns, with the saved diff and aux -> (dx, dy, dneg)
  // in the inputs' dtype ((0, K) where not needed).
  m.def("contrastive_fwd_cxx(Tensor x, Tensor? y, Tensor? negatives, Tensor? labels_x, Tensor? labels_y, Tensor? crow, Tensor? col, Tensor scale, Tensor bias, int x_start, int x_end, int y_start, int y_end, int flags, float sigma) -> (Tensor diff_x, Tensor aux_x, Tensor diff_y, Tensor aux_y)");
  m.def("contrastive_bwd_cxx(Tensor grad_x, Tensor grad_y, Tensor x, Tensor? y, Tensor? negatives, Tensor? labels_x, Tensor? labels_y, Tensor? crow, Tensor? col, Tensor diff_x, Tensor diff_y, Tensor aux_x, Tensor aux_y, Tensor scale, Tensor bias, int x_start, int x_end, int y_start, int y_end, int flags, float sigma, bool need_x, bool need_y, bool need_negatives) -> (Tensor dx, Tensor dy, Tensor dnegatives)");

  // ---- matrix log / matrix cross-entropy / Matrix-SSL
  // (csrc/cpu/matrix_info.cpp, csrc/cuda/matrix_info.cu; math in csrc/cpu/matrix_info_impl.h)
  // One direction of Matrix-SSL, U(p, z) + γ·A(p, z), log by the order-n Taylor series.
  // Returns the loss and what the backward needs: Xu = C + (μ-1)I (C = pcᵀzc/N), P = Sp + μI,
  // Xa = Sz + (μ-1)I (Sp, Sz symmetrised) and the stacked K×K products (Xu^2..Xu^h,
  // P·Xa^1..P·Xa^{n-1}), all in fp32 (fp64 for fp64). Xu and Xa also feed the convergence guard.
  m.def("matrix_ssl_fwd_cxx(Tensor p, Tensor z, float lambd, float mu, float gamma, int order) -> (Tensor loss, Tensor xu, Tensor pa, Tensor xa, Tensor saved)");
  m.def("matrix_ssl_bwd_cxx(Tensor grad, Tensor p, Tensor z, Tensor xu, Tensor pa, Tensor xa, Tensor saved, float lambd, float mu, float gamma, int order, bool need_p, bool need_z) -> (Tensor grad_p, Tensor grad_z)");
  // Matrix cross-entropy tr(-P log Q + Q), P and Q general (K, K): the loss, X = Q - I and the
  // chain P·X^1..P·X^{n-1} stacked ((n-1, K, K)), all fp32 (fp64 for fp64); X feeds the guard.
  // The backward returns (dL/dP, dL/dQ)·grad in the inputs' dtype (zeros where not needed).
  m.def("matrix_mce_fwd_cxx(Tensor p, Tensor q, int order) -> (Tensor loss, Tensor x, Tensor saved)");
  m.def("matrix_mce_bwd_cxx(Tensor grad, Tensor p, Tensor x, Tensor saved, int order, bool need_p, bool need_q) -> (Tensor grad_p, Tensor grad_q)");
}

namespace {
PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef SSLOPS_WITH_CUDA
  return PyBool_FromLong(1);
#else
  return PyBool_FromLong(0);
#endif
}

PyObject* built_with_openmp(PyObject*, PyObject*) {
#ifdef _OPENMP
  return PyBool_FromLong(1);
#else
  return PyBool_FromLong(0);
#endif
}

// The CPU kernels' vector ISA level now ("default", "avx2", "avx512"; csrc/cpu/cpu_capability.h);
// ValueError for an SSLOPS_CPU_CAPABILITY that names none of them.
PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sslops::cpu_capability_name(sslops::cpu_capability()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in"},
    {"built_with_openmp", built_with_openmp, METH_NOARGS, "True when the CPU kernels use OpenMP threads"},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The vector ISA level of the CPU kernels' loops now"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                       // m_name
    "sslops compiled kernels; the ops live in torch.ops.sslops",  // m_doc
    -1,                                                         // m_size: no per-module state
    methods,
};
}  // namespace

// Importing sslops._C loads this library, whose static initialisers (TORCH_LIBRARY,
// TORCH_LIBRARY_IMPL) register every schema and kernel with the dispatcher.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
