// CUDA graphs for the training step: at::cuda::CUDAGraph, captured on a
// side stream of its own (capture cannot run on the default stream), as
// torch.cuda.graph does. In a build without CUDA every call fails with a
// message saying so.

#include <cstdio>

#ifdef USE_CUDA
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {

struct Graph {
    explicit Graph(int device)
        : device(static_cast<c10::DeviceIndex>(device)),
          side(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device))) {}

    c10::DeviceIndex device;
    at::cuda::CUDAGraph graph;
    c10::cuda::CUDAStream side;
    // The stream that was current before `enter`, restored by `leave`.
    std::optional<c10::cuda::CUDAStream> before;
    bool cache_before = true;
};

}  // namespace
#endif

extern "C" {

#ifdef USE_CUDA
#define FL_TRY(body)                                               \
    try {                                                          \
        body;                                                      \
        return 0;                                                  \
    } catch (const std::exception& e) {                            \
        std::snprintf(error, error_len, "%s", e.what());           \
        return 1;                                                  \
    }
#endif

// A graph for `device`, with its side stream; null (and a message) on
// failure.
void* fl_cuda_graph_new(int device, char* error, size_t error_len) {
#ifdef USE_CUDA
    try {
        return new Graph(device);
    } catch (const std::exception& e) {
        std::snprintf(error, error_len, "%s", e.what());
        return nullptr;
    }
#else
    (void)device;
    std::snprintf(error, error_len, "CUDA graphs need a build with CUDA (the `cuda` feature)");
    return nullptr;
#endif
}

// Makes the graph's side stream current, after the work queued so far on
// the current one; what runs until `fl_cuda_graph_leave` (warm-up
// iterations, a capture) goes there.
int fl_cuda_graph_enter(void* handle, char* error, size_t error_len) {
#ifdef USE_CUDA
    FL_TRY({
        auto* g = static_cast<Graph*>(handle);
        auto current = c10::cuda::getCurrentCUDAStream(g->device);
        at::cuda::CUDAEvent ready;
        ready.record(current);
        ready.block(g->side);
        g->before = current;
        c10::cuda::setCurrentCUDAStream(g->side);
    })
#else
    (void)handle;
    std::snprintf(error, error_len, "CUDA graphs need a build with CUDA");
    return 1;
#endif
}

// Back to the stream current before `fl_cuda_graph_enter`, which waits
// for the side stream's work.
int fl_cuda_graph_leave(void* handle, char* error, size_t error_len) {
#ifdef USE_CUDA
    FL_TRY({
        auto* g = static_cast<Graph*>(handle);
        if (g->before) {
            at::cuda::CUDAEvent done;
            done.record(g->side);
            done.block(*g->before);
            c10::cuda::setCurrentCUDAStream(*g->before);
            g->before.reset();
        }
    })
#else
    (void)handle;
    std::snprintf(error, error_len, "CUDA graphs need a build with CUDA");
    return 1;
#endif
}

// Starts capturing what is queued on the side stream (entered); autocast's
// cast cache is off during the capture, as torch's graphed callables
// have it, so that no cast made in it outlives it.
int fl_cuda_graph_capture_begin(void* handle, char* error, size_t error_len) {
#ifdef USE_CUDA
    FL_TRY({
        auto* g = static_cast<Graph*>(handle);
        g->cache_before = at::autocast::is_autocast_cache_enabled();
        at::autocast::set_autocast_cache_enabled(false);
        g->graph.capture_begin();
    })
#else
    (void)handle;
    std::snprintf(error, error_len, "CUDA graphs need a build with CUDA");
    return 1;
#endif
}

int fl_cuda_graph_capture_end(void* handle, char* error, size_t error_len) {
#ifdef USE_CUDA
    auto* g = static_cast<Graph*>(handle);
    try {
        g->graph.capture_end();
        at::autocast::set_autocast_cache_enabled(g->cache_before);
        return 0;
    } catch (const std::exception& e) {
        at::autocast::set_autocast_cache_enabled(g->cache_before);
        std::snprintf(error, error_len, "%s", e.what());
        return 1;
    }
#else
    (void)handle;
    std::snprintf(error, error_len, "CUDA graphs need a build with CUDA");
    return 1;
#endif
}

// Launches the captured work on the current stream.
int fl_cuda_graph_replay(void* handle, char* error, size_t error_len) {
#ifdef USE_CUDA
    FL_TRY(static_cast<Graph*>(handle)->graph.replay())
#else
    (void)handle;
    std::snprintf(error, error_len, "CUDA graphs need a build with CUDA");
    return 1;
#endif
}

void fl_cuda_graph_free(void* handle) {
#ifdef USE_CUDA
    delete static_cast<Graph*>(handle);
#else
    (void)handle;
#endif
}

}  // extern "C"
