// Autograd of slimops::batch_norm_act (one width's batch norm + residual + activation).
// Reference: slimops.reference.batch_norm_act. See common.h for why this is C++.
#include "autograd/common.h"

#include <tuple>

namespace slimops {
namespace autograd {
namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// slimops::batch_norm_act below autograd (under the node, and the no-graph path).
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

// Backward of one batch_norm_act call. Next edges: input 0, weight 1, bias 2, running_mean
// 3, running_var 4, residual 5; only the output has a history (the batch statistics are not
// differentiable, as torch's native_batch_norm's are not).
struct BatchNormActBackward : SavedNode {
  SavedVariable input_, weight_, out_, mean_, var_;
  bool training_ = false;
  double eps_ = 0.0;
  int64_t activation_ = 0;

  std::string name() const override { return "slimops::BatchNormActBackward"; }

  void each_saved(const std::function<void(SavedVariable&, bool)>& f) override {
    f(input_, false);
    f(weight_, false);
    f(out_, true);
    f(mean_, false);
    f(var_, false);
  }

  void collect_numbers(CompiledNodeArgs& args) const override {
    args.collect(training_);
    args.collect(eps_);
    args.collect(activation_);
  }

  variable_list apply(variable_list&& grads) override {
    static const auto backward_op =
        op_handle<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptTensor&, const at::Tensor&, const at::Tensor&, double, bool,
                        int64_t)>("slimops::batch_norm_act_backward");
    variable_list result(6);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // no gradient flowed: every gradient is zero
    const at::Tensor input = input_.unpack(), weight = weight_.unpack(),
                     out = out_.unpack(getptr()), mean = mean_.unpack(), var = var_.unpack();
    const std::vector<bool> needs = needed_grads(*this);
    // The residual's gradient is the activation's masked gradient. When it is wanted, it is
    // computed first and the BN backward runs on it with no activation: one pass over
    // grad_out and out instead of that pass plus the BN backward's own reads of both (the
    // BN backward reads its gradient twice, for the sums and for grad_input).
    at::Tensor grad_bn = grad_out;
    int64_t bn_activation = activation_;
    if (needs[5]) {
      result[5] = epilogue_grads(grad_out, out, std::nullopt, activation_, true).grad_pre;
      grad_bn = result[5];
      bn_activation = 0;  // kNone
    }
    if (needs[0] || needs[1] || needs[2]) {
      auto [gi, gw, gb] = backward_op.call(grad_bn, input, out, optional(weight), mean, var,
                                           eps_, training_, bn_activation);
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
  auto node = make_node<BatchNormActBackward>("batch_norm_act", input, weight, bias,
                                              running_mean, running_var, residual);
  Stats result = batch_norm_act_op(input, weight, bias, running_mean, running_var, training,
                                   eps, residual, activation);
  const auto& [out, mean, var] = result;
  torch::autograd::set_history(out, node);
  node->input_ = SavedVariable(input, false);
  node->weight_ = SavedVariable(weight, false);
  node->out_ = SavedVariable(out, true);
  node->mean_ = SavedVariable(mean, false);
  node->var_ = SavedVariable(var, false);
  node->training_ = training;
  node->eps_ = eps;
  node->activation_ = activation;
  return result;
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
