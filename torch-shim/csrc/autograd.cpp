// `torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)`:
// the gradients of a unit's outputs with respect to chosen inputs, without
// accumulating into `.grad` (tch's `run_backward` has no grad_outputs).

#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <vector>

extern "C" {

// Tensors are tch handles (at::Tensor*). On success `results[i]` is a new
// handle, or null where `inputs[i]` did not take part; returns 0. On failure
// returns 1 with a message in `error`.
int fl_autograd_grad(void** outputs, void** grad_outputs, int n_outputs, void** inputs,
                     int n_inputs, void** results, char* error, size_t error_len) {
    try {
        std::vector<at::Tensor> outs, grads, ins;
        for (int i = 0; i < n_outputs; ++i) {
            outs.push_back(*static_cast<at::Tensor*>(outputs[i]));
            grads.push_back(*static_cast<at::Tensor*>(grad_outputs[i]));
        }
        for (int i = 0; i < n_inputs; ++i) {
            ins.push_back(*static_cast<at::Tensor*>(inputs[i]));
        }
        const auto computed = torch::autograd::grad(outs, ins, grads, /*retain_graph=*/false,
                                                    /*create_graph=*/false,
                                                    /*allow_unused=*/true);
        for (int i = 0; i < n_inputs; ++i) {
            results[i] = computed[i].defined() ? new at::Tensor(computed[i]) : nullptr;
        }
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return 1;
    }
}

}  // extern "C"
