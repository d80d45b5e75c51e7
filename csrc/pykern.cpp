// The only PYBIND11_MODULE of pykern._C: one m.def per entry point of pykern.h, by family.
#include <torch/extension.h>

#include "common/index.h"
#include "common/poison.h"
#include "pykern.h"

// Stringifies the arch list that setup.py passes as -DPYKERN_CUDA_ARCHS=8.0,9.0+PTX.
#define PK_STRINGIFY(...) #__VA_ARGS__
#define PK_XSTRINGIFY(...) PK_STRINGIFY(__VA_ARGS__)

namespace {

bool built_with_cuda() {
#ifdef PYKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#if defined(PYKERN_WITH_CUDA) && defined(PYKERN_CUDA_ARCHS)
  return PK_XSTRINGIFY(PYKERN_CUDA_ARCHS);
#else
  return "";
#endif
}

// The PermutePlan as a dict, so the Triton launcher executes the very plan the C++ kernels do.
py::dict permute_plan(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
                      const std::vector<int64_t>& perm) {
  const pykern::PermutePlan p = pykern::make_permute_plan(sizes, strides, perm);
  py::list batch;
  for (int d = 0; d < p.nbatch; ++d) {
    batch.append(py::make_tuple(p.batch_size[d], p.batch_in[d], p.batch_out[d]));
  }
  py::dict plan;
  plan["batch"] = batch;
  plan["batch_count"] = p.batch_count;
  plan["rows"] = p.rows;
  plan["row_in"] = p.row_in;
  plan["row_out"] = p.row_out;
  plan["cols"] = p.cols;
  plan["col_in"] = p.col_in;
  plan["numel"] = p.numel;
  plan["transposed"] = p.transposed();
  return plan;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykern kernels: C++ CPU references and CUDA kernels (see pykern.h)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "the CUDA architectures compiled in, e.g. '8.0,9.0+PTX'");

  m.def(
      "set_poison_outputs", [](bool on) { pykern::poison_outputs_flag().store(on); },
      "tests: fill every kernel output with 0xFF bytes before the kernel writes it", py::arg("on"));
  m.def("poison_outputs", &pykern::poison_outputs, "whether outputs are poisoned first");

  // layout
  m.def("permute_plan", &permute_plan, "the batch x rows x cols plan of permute_copy",
        py::arg("sizes"), py::arg("strides"), py::arg("perm"));
  m.def("permute_copy_cpu", &pykern::permute_copy_cpu, "x.permute(perm).contiguous() on CPU",
        py::arg("x"), py::arg("perm"));
#ifdef PYKERN_WITH_CUDA
  m.def("permute_copy_cuda", &pykern::permute_copy_cuda, "x.permute(perm).contiguous() on CUDA",
        py::arg("x"), py::arg("perm"));
#endif

  // pooling
  m.def("pool_reduce_fwd_cpu", &pykern::pool_reduce_fwd_cpu, py::arg("x"), py::arg("is_max"),
        py::arg("with_indices"));
  m.def("pool_reduce_bwd_cpu", &pykern::pool_reduce_bwd_cpu, py::arg("grad_out"),
        py::arg("indices"), py::arg("R"), py::arg("is_max"));
#ifdef PYKERN_WITH_CUDA
  m.def("pool_reduce_fwd_cuda", &pykern::pool_reduce_fwd_cuda, py::arg("x"), py::arg("is_max"),
        py::arg("with_indices"));
  m.def("pool_reduce_bwd_cuda", &pykern::pool_reduce_bwd_cuda, py::arg("grad_out"),
        py::arg("indices"), py::arg("R"), py::arg("is_max"));
#endif
  m.def("max_pool2d_fwd_cpu", &pykern::max_pool2d_fwd_cpu, py::arg("x"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("out_size"),
        py::arg("adaptive"), py::arg("channels_last"),
        py::arg("with_indices"));
  m.def("max_pool2d_bwd_cpu", &pykern::max_pool2d_bwd_cpu, py::arg("grad_out"), py::arg("indices"),
        py::arg("in_size"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("adaptive"), py::arg("channels_last"));
  m.def("avg_pool2d_fwd_cpu", &pykern::avg_pool2d_fwd_cpu, py::arg("x"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("out_size"), py::arg("adaptive"),
        py::arg("count_include_pad"), py::arg("divisor_override"), py::arg("channels_last"));
  m.def("avg_pool2d_bwd_cpu", &pykern::avg_pool2d_bwd_cpu, py::arg("grad_out"), py::arg("in_size"),
        py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("adaptive"),
        py::arg("count_include_pad"), py::arg("divisor_override"), py::arg("channels_last"));
#ifdef PYKERN_WITH_CUDA
  m.def("max_pool2d_fwd_cuda", &pykern::max_pool2d_fwd_cuda, py::arg("x"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("out_size"),
        py::arg("adaptive"), py::arg("channels_last"),
        py::arg("with_indices"));
  m.def("max_pool2d_bwd_cuda", &pykern::max_pool2d_bwd_cuda, py::arg("grad_out"), py::arg("indices"),
        py::arg("in_size"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("adaptive"), py::arg("channels_last"));
  m.def("avg_pool2d_fwd_cuda", &pykern::avg_pool2d_fwd_cuda, py::arg("x"), py::arg("kernel"),
        py::arg("stride"), py::arg("padding"), py::arg("out_size"), py::arg("adaptive"),
        py::arg("count_include_pad"), py::arg("divisor_override"), py::arg("channels_last"));
  m.def("avg_pool2d_bwd_cuda", &pykern::avg_pool2d_bwd_cuda, py::arg("grad_out"), py::arg("in_size"),
        py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("adaptive"),
        py::arg("count_include_pad"), py::arg("divisor_override"), py::arg("channels_last"));
#endif

  // normalization
  m.def("row_norm_fwd_cpu", &pykern::row_norm_fwd_cpu, py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("row_norm_bwd_cpu", &pykern::row_norm_bwd_cpu, py::arg("grad_y"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("grad_sum"), py::arg("rms"),
        py::arg("need_dweight"), py::arg("need_dbias"));
  m.def("batch_norm_stats_cpu", &pykern::batch_norm_stats_cpu, py::arg("x"));
  m.def("batch_norm_update_running_cpu", &pykern::batch_norm_update_running_cpu, py::arg("mean"),
        py::arg("var"), py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"),
        py::arg("var_factor"));
  m.def("batch_norm_fwd_cpu", &pykern::batch_norm_fwd_cpu, py::arg("x"), py::arg("mean"),
        py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("eps"),
        py::arg("relu"));
  m.def("batch_norm_bwd_reduce_cpu", &pykern::batch_norm_bwd_reduce_cpu, py::arg("grad_y"),
        py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("var"), py::arg("eps"));
  m.def("batch_norm_bwd_cpu", &pykern::batch_norm_bwd_cpu, py::arg("grad_y"), py::arg("x"),
        py::arg("y"), py::arg("mean"), py::arg("var"), py::arg("weight"), py::arg("sum_dy"),
        py::arg("sum_dy_xhat"), py::arg("eps"), py::arg("count"),
        py::arg("want_grad_residual"));
#ifdef PYKERN_WITH_CUDA
  m.def("row_norm_fwd_cuda", &pykern::row_norm_fwd_cuda, py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("row_norm_bwd_cuda", &pykern::row_norm_bwd_cuda, py::arg("grad_y"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("grad_sum"), py::arg("rms"),
        py::arg("need_dweight"), py::arg("need_dbias"));
  m.def("batch_norm_stats_cuda", &pykern::batch_norm_stats_cuda, py::arg("x"));
  m.def("batch_norm_update_running_cuda", &pykern::batch_norm_update_running_cuda,
        py::arg("mean"), py::arg("var"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("momentum"), py::arg("var_factor"));
  m.def("batch_norm_fwd_cuda", &pykern::batch_norm_fwd_cuda, py::arg("x"), py::arg("mean"),
        py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("eps"),
        py::arg("relu"));
  m.def("batch_norm_bwd_reduce_cuda", &pykern::batch_norm_bwd_reduce_cuda, py::arg("grad_y"),
        py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("var"), py::arg("eps"));
  m.def("batch_norm_bwd_cuda", &pykern::batch_norm_bwd_cuda, py::arg("grad_y"), py::arg("x"),
        py::arg("y"), py::arg("mean"), py::arg("var"), py::arg("weight"), py::arg("sum_dy"),
        py::arg("sum_dy_xhat"), py::arg("eps"), py::arg("count"),
        py::arg("want_grad_residual"));
#endif

  // convolution
  m.def("conv2d_fwd_cpu", &pykern::conv2d_fwd_cpu, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("channels_last"), py::arg("workspace_bytes"));
  m.def("conv2d_bwd_input_cpu", &pykern::conv2d_bwd_input_cpu, py::arg("grad_y"),
        py::arg("weight"), py::arg("bias"), py::arg("in_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("channels_last"),
        py::arg("workspace_bytes"));
  m.def("conv2d_bwd_weight_cpu", &pykern::conv2d_bwd_weight_cpu, py::arg("grad_y"),
        py::arg("x"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("channels_last"),
        py::arg("workspace_bytes"));
#ifdef PYKERN_WITH_CUDA
  m.def("conv2d_fwd_cuda", &pykern::conv2d_fwd_cuda, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("channels_last"), py::arg("workspace_bytes"));
  m.def("conv2d_bwd_input_cuda", &pykern::conv2d_bwd_input_cuda, py::arg("grad_y"),
        py::arg("weight"), py::arg("bias"), py::arg("in_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("channels_last"),
        py::arg("workspace_bytes"));
  m.def("conv2d_bwd_weight_cuda", &pykern::conv2d_bwd_weight_cuda, py::arg("grad_y"),
        py::arg("x"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("channels_last"),
        py::arg("workspace_bytes"));
#endif

  // attention
  m.def("attention_fwd_cpu", &pykern::attention_fwd_cpu, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("scale"), py::arg("is_causal"),
        py::arg("dropout_p"), py::arg("seed"));
  m.def("attention_bwd_cpu", &pykern::attention_bwd_cpu, py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
        py::arg("scale"), py::arg("is_causal"), py::arg("dropout_p"), py::arg("seed"));
  m.def("attention_materialized_cpu", &pykern::attention_materialized_cpu, py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("scale"), py::arg("is_causal"),
        py::arg("dropout_p"), py::arg("seed"));
#ifdef PYKERN_WITH_CUDA
  m.def("attention_fwd_cuda", &pykern::attention_fwd_cuda, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("scale"), py::arg("is_causal"),
        py::arg("dropout_p"), py::arg("seed"));
  m.def("attention_bwd_cuda", &pykern::attention_bwd_cuda, py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
        py::arg("scale"), py::arg("is_causal"), py::arg("dropout_p"), py::arg("seed"));
#endif
}
