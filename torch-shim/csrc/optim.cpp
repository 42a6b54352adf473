// AdamW through PyTorch's fused kernel (`torch.optim.AdamW(fused=True)`):
// one pass over the parameters, gradients and moments, on the CPU or a GPU.

#include <ATen/ATen.h>

#include <cstdio>

extern "C" {

// Tensors are tch handles (at::Tensor*). `step` is the step count after
// this update (torch increments it before the kernel). Returns 0, or 1 with
// a message in `error`.
int fl_fused_adamw(void* param, void* grad, void* exp_avg, void* exp_avg_sq, double lr,
                   double beta1, double beta2, double weight_decay, double eps, long step,
                   char* error, size_t error_len) {
    try {
        const auto& p = *static_cast<at::Tensor*>(param);
        const at::Tensor steps = at::full({}, static_cast<double>(step),
                                          p.options().dtype(at::kFloat));
        at::_fused_adamw_({p}, {*static_cast<at::Tensor*>(grad)},
                          {*static_cast<at::Tensor*>(exp_avg)},
                          {*static_cast<at::Tensor*>(exp_avg_sq)}, {}, {steps}, lr, beta1, beta2,
                          weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return 1;
    }
}

}  // extern "C"
