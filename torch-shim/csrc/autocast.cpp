// Automatic mixed precision for the training step: PyTorch's autocast state
// for a device type (CPU or CUDA), which tch only exposes for CUDA.

#include <ATen/autocast_mode.h>

extern "C" {

// device: 0 = CPU, 1 = CUDA. dtype: 0 = bfloat16, 1 = float16.
// Returns whether autocast was enabled before.
int fl_autocast_enter(int device, int dtype) {
    const auto type = device == 1 ? at::kCUDA : at::kCPU;
    const bool before = at::autocast::is_autocast_enabled(type);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::set_autocast_dtype(type, dtype == 1 ? at::kHalf : at::kBFloat16);
    at::autocast::increment_nesting();
    return before ? 1 : 0;
}

void fl_autocast_exit(int device, int enabled_before) {
    const auto type = device == 1 ? at::kCUDA : at::kCPU;
    if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, enabled_before != 0);
}

}  // extern "C"
