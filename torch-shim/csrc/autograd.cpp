// `torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)`:
// the gradients of a unit's outputs with respect to chosen inputs, without
// accumulating into `.grad` (tch's `run_backward` has no grad_outputs).

#include <c10/core/DeviceGuard.h>
#include <c10/core/StorageImpl.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#ifdef USE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

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

// Frees the bytes of the storage under `tensor`, keeping the storage object
// (so the tensor, its views and any autograd-saved view of it keep pointing
// at it) with no bytes: FSDP's `untyped_storage().resize_(0)`. Returns the
// bytes it held.
int64_t fl_storage_free(void* tensor) {
    auto* storage = static_cast<at::Tensor*>(tensor)->storage().unsafeGetStorageImpl();
    const auto bytes = static_cast<int64_t>(storage->nbytes());
    storage->reset();
    return bytes;
}

// Gives the storage under `tensor` `bytes` fresh bytes from its own
// allocator (contents undefined): FSDP's `resize_(n)` before it gathers
// into it again. Returns 0, or 1 with a message in `error`.
int fl_storage_alloc(void* tensor, int64_t bytes, char* error, size_t error_len) {
    try {
        const auto& t = *static_cast<at::Tensor*>(tensor);
        auto* storage = t.storage().unsafeGetStorageImpl();
        auto* allocator = storage->allocator();
        if (allocator == nullptr) {
            std::snprintf(error, error_len, "the storage has no allocator");
            return 1;
        }
        c10::OptionalDeviceGuard guard(t.device());
        storage->set_data_ptr_noswap(allocator->allocate(static_cast<size_t>(bytes)));
        storage->set_nbytes(static_cast<size_t>(bytes));
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return 1;
    }
}

// Copies `source`'s values into the storage under `target` (given bytes
// again by fl_storage_alloc) through an alias of its own, so that
// `target`'s version counter, which the autograd graph checks for the
// tensors it saved, does not move: selective recompute writing an output
// back where the graph saved it. Returns 0, or 1 with a message in `error`.
int fl_storage_refill(void* target, void* source, char* error, size_t error_len) {
    try {
        const auto& into = *static_cast<at::Tensor*>(target);
        const auto& from = *static_cast<at::Tensor*>(source);
        torch::autograd::AutoGradMode no_grad(false);
        c10::OptionalDeviceGuard guard(into.device());
        auto alias = at::empty({0}, into.options().requires_grad(false));
        alias.set_(into.storage(), into.storage_offset(), into.sizes(), into.strides());
        alias.copy_(from);
        return 0;
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return 1;
    }
}

// The bytes the CUDA caching allocator has handed out on `device` and not
// yet been given back (`torch.cuda.memory_allocated`); -1 in a build
// without CUDA.
int64_t fl_cuda_allocated_bytes(int device) {
#ifdef USE_CUDA
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .current;
#else
    (void)device;
    return -1;
#endif
}

}  // extern "C"
