// Autograd of slimops::batch_norm_act (one width's batch norm + residual + activation).
// Reference: slimops.reference.batch_norm_act. See common.h for why this is C++.
#include "autograd/common.h"

#include <tuple>

namespace slimops {
namespace autograd {
namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// slimops::batch_norm_act below autograd (the Function's forward and the no-graph path).
Stats batch_norm_act_op(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& running_mean, const OptTensor& running_var,
                        bool training, double eps, const OptTensor& residual,
                        int64_t activation) {
  static const auto op =
      op_handle<Stats(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, bool, double, const OptTensor&, int64_t)>(
          "slimops::batch_norm_act");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(input, weight, bias, running_mean, running_var, training, eps, residual,
                 activation);
}

class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double eps, const OptTensor& residual,
                               int64_t activation) {
    Stats result = batch_norm_act_op(input, weight, bias, running_mean, running_var, training,
                                     eps, residual, activation);
    const auto& [out, mean, var] = result;
    ctx->mark_non_differentiable({mean, var});
    save_edges(ctx, {true, present(weight), present(bias), present(running_mean),
                     present(running_var), false, false, present(residual), false});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), out, mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        op_handle<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptTensor&, const at::Tensor&, const at::Tensor&, double, bool,
                        int64_t)>("slimops::batch_norm_act_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &out = saved[2], &mean = saved[3],
                     &var = saved[4], &grad_out = grads[0];
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const std::vector<bool> needs = needs_input_grad(ctx);
    variable_list result(9);
    // The residual's gradient is the activation's masked gradient. When it is wanted, it is
    // computed first and the BN backward runs on it with no activation: one pass over
    // grad_out and out instead of that pass plus the BN backward's own reads of both (the
    // BN backward reads its gradient twice, for the sums and for grad_input).
    at::Tensor grad_bn = grad_out;
    int64_t bn_activation = activation;
    if (needs[7]) {
      result[7] = epilogue_grads(grad_out, out, std::nullopt, activation, true).grad_pre;
      grad_bn = result[7];
      bn_activation = 0;  // kNone
    }
    if (needs[0] || needs[1] || needs[2]) {
      auto [gi, gw, gb] = backward_op.call(
          grad_bn, input, out, optional(weight), mean, var,
          ctx->saved_data["eps"].toDouble(), ctx->saved_data["training"].toBool(), bn_activation);
      if (needs[0]) result[0] = gi;
      if (needs[1]) result[1] = gw;
      if (needs[2]) result[2] = gb;
    }
    return result;
  }
};

Stats batch_norm_act_autograd(const at::Tensor& input, const OptTensor& weight,
                              const OptTensor& bias, const OptTensor& running_mean,
                              const OptTensor& running_var, bool training, double eps,
                              const OptTensor& residual, int64_t activation) {
  if (!graph_needed(input, weight, bias, running_mean, running_var, residual))
    return batch_norm_act_op(input, weight, bias, running_mean, running_var, training, eps,
                             residual, activation);
  variable_list out = BatchNormActFunction::apply(input, weight, bias, running_mean, running_var,
                                                  training, eps, residual, activation);
  return {out[0], out[1], out[2]};
}

// update_running_stats has no gradient (running statistics are buffers); what autograd owes
// an in-place op is the version bump, so saved tensors and identity-and-version caches (the
// eval plans of slimops.nn.fused) see the update.
void update_running_stats_autograd(at::Tensor& running_mean, at::Tensor& running_var,
                                   const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                   double momentum) {
  static const auto op =
      op_handle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                     double)>("slimops::update_running_stats");
  TORCH_CHECK(!(running_mean.requires_grad() || running_var.requires_grad() ||
                mean.requires_grad() || var.requires_grad()),
              "slimops::update_running_stats: the statistics have no gradient; got a tensor "
              "that requires grad");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(running_mean, running_var, mean, var, count, momentum);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimops, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_autograd);
  m.impl("update_running_stats", &update_running_stats_autograd);
}

}  // namespace autograd
}  // namespace slimops
