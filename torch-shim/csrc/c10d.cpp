// C ABI over libtorch's c10d process groups, for the Rust crate
// `flamingo-collectives`. Every entry point catches C++ exceptions and turns
// them into an error string owned by the caller (free it with
// fl_string_free); nothing here may abort the process.
//
// Per-operation timeouts are left unset, as torch.distributed leaves them:
// the group's timeout (set at creation) bounds every operation, and waits are
// bounded separately in fl_work_wait.
//
// Tensors arrive as `at::Tensor*`, which is what tch's `C_tensor` pointers
// really are (torch-sys wraps `torch::Tensor*`).

#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstring>
#include <memory>
#include <string>

namespace {

char* copy_string(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

template <typename F>
auto guarded(char** error, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::Error& exception) {
    // what() carries a C++ stack trace; the message alone is what users need.
    *error = copy_string(exception.what_without_backtrace());
  } catch (const std::exception& exception) {
    *error = copy_string(exception.what());
  } catch (...) {
    *error = copy_string("unknown C++ exception in c10d");
  }
  return decltype(body())();
}

// Codes shared with src/ffi.rs.
c10d::ReduceOp to_reduce_op(int code) {
  switch (code) {
    case 0:
      return c10d::ReduceOp(c10d::ReduceOp::SUM);
    case 1:
      return c10d::ReduceOp(c10d::ReduceOp::SUM);  // AVG: SUM, divided on wait
    case 2:
      return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 3:
      return c10d::ReduceOp(c10d::ReduceOp::MIN);
    case 4:
      return c10d::ReduceOp(c10d::ReduceOp::PRODUCT);
    default:
      throw std::invalid_argument("unknown reduce op code " + std::to_string(code));
  }
}

constexpr int kReduceAvg = 1;

}  // namespace

struct FlProcessGroup {
  c10::intrusive_ptr<c10d::Store> store;
  // The TCP store itself, for subgroups (each under its own prefix).
  c10::intrusive_ptr<c10d::Store> tcp_store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int world_size;
  bool is_nccl;
  std::string local_hostname;
  int64_t timeout_ms;
};

// Gloo or NCCL over `store` for (rank, world_size).
static void make_backend(FlProcessGroup* group, const std::string& backend, int rank,
                         int world_size, const c10::intrusive_ptr<c10d::Store>& store) {
  const auto timeout = std::chrono::milliseconds(group->timeout_ms);
  if (backend == "gloo") {
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (group->local_hostname.empty()) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    } else {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(group->local_hostname));
    }
    group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    group->is_nccl = false;
  } else if (backend == "nccl") {
#ifdef USE_C10D_NCCL
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
    group->is_nccl = true;
#else
    throw std::invalid_argument(
        "backend nccl is not compiled in; rebuild flamingo with the `cuda` cargo feature");
#endif
  } else {
    throw std::invalid_argument("unknown c10d backend '" + backend + "' (expected gloo or nccl)");
  }
}

// A pending collective. Gloo has no AVG reduction, so for AVG the result is
// divided by the world size once the sum has arrived (on wait).
struct FlWork {
  c10::intrusive_ptr<c10d::Work> work;
  at::Tensor divide_after;  // undefined unless the op was AVG
  int world_size;
};

extern "C" {

void fl_string_free(char* text) { std::free(text); }

FlProcessGroup* fl_pg_new(const char* backend_name, const char* master_addr, int master_port,
                          int rank, int world_size, const char* local_hostname,
                          const char* prefix, int64_t timeout_ms, char** error) {
  return guarded(error, [&]() -> FlProcessGroup* {
    const auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(master_port);
    store_options.isServer = rank == 0;
    store_options.numWorkers = world_size;
    store_options.waitWorkers = true;
    store_options.timeout = timeout;
    auto tcp_store = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), store_options);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp_store);

    auto group = std::make_unique<FlProcessGroup>();
    group->store = store;
    group->tcp_store = tcp_store;
    group->world_size = world_size;
    group->local_hostname = std::string(local_hostname);
    group->timeout_ms = timeout_ms;
    make_backend(group.get(), std::string(backend_name), rank, world_size, store);
    return group.release();
  });
}

// A group of some of `parent`'s processes over the parent's store under
// `prefix` (every member calls this with the same prefix; the others do
// not). `rank` and `world_size` are within the subgroup.
FlProcessGroup* fl_pg_new_subgroup(FlProcessGroup* parent, const char* prefix, int rank,
                                   int world_size, char** error) {
  return guarded(error, [&]() -> FlProcessGroup* {
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), parent->tcp_store);
    auto group = std::make_unique<FlProcessGroup>();
    group->store = store;
    group->tcp_store = parent->tcp_store;
    group->world_size = world_size;
    group->local_hostname = parent->local_hostname;
    group->timeout_ms = parent->timeout_ms;
    make_backend(group.get(), parent->is_nccl ? "nccl" : "gloo", rank, world_size, store);
    return group.release();
  });
}

void fl_pg_free(FlProcessGroup* group) {
  try {
    delete group;
  } catch (...) {
    // A destructor that throws (dead peer during shutdown) must not abort.
  }
}

FlWork* fl_all_reduce(FlProcessGroup* group, at::Tensor* tensor, int op,
                      int async_op, char** error) {
  return guarded(error, [&]() -> FlWork* {
    c10d::AllreduceOptions options;
    options.reduceOp = to_reduce_op(op);
    options.asyncOp = async_op != 0;
    std::vector<at::Tensor> tensors{*tensor};
    auto work = group->backend->allreduce(tensors, options);
    return new FlWork{work, op == kReduceAvg ? *tensor : at::Tensor(), group->world_size};
  });
}

FlWork* fl_all_gather_into_tensor(FlProcessGroup* group, at::Tensor* output, at::Tensor* input,
                                  int async_op, char** error) {
  return guarded(error, [&]() -> FlWork* {
    c10d::AllgatherOptions options;
    options.asyncOp = async_op != 0;
    auto work = group->backend->_allgather_base(*output, *input, options);
    return new FlWork{work, at::Tensor(), group->world_size};
  });
}

FlWork* fl_reduce_scatter_tensor(FlProcessGroup* group, at::Tensor* output, at::Tensor* input,
                                 int op, int async_op, char** error) {
  return guarded(error, [&]() -> FlWork* {
    c10d::ReduceScatterOptions options;
    options.reduceOp = to_reduce_op(op);
    options.asyncOp = async_op != 0;
    auto work = group->backend->_reduce_scatter_base(*output, *input, options);
    return new FlWork{work, op == kReduceAvg ? *output : at::Tensor(), group->world_size};
  });
}

FlWork* fl_broadcast(FlProcessGroup* group, at::Tensor* tensor, int root, int async_op, char** error) {
  return guarded(error, [&]() -> FlWork* {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.asyncOp = async_op != 0;
    std::vector<at::Tensor> tensors{*tensor};
    auto work = group->backend->broadcast(tensors, options);
    return new FlWork{work, at::Tensor(), group->world_size};
  });
}

// Reduces every rank's `tensor` into root's, in place; on the other ranks
// the tensor's contents are undefined afterwards (gloo uses it as scratch).
FlWork* fl_reduce(FlProcessGroup* group, at::Tensor* tensor, int root, int op, int async_op,
                  char** error) {
  return guarded(error, [&]() -> FlWork* {
    c10d::ReduceOptions options;
    options.rootRank = root;
    options.reduceOp = to_reduce_op(op);
    options.asyncOp = async_op != 0;
    std::vector<at::Tensor> tensors{*tensor};
    auto work = group->backend->reduce(tensors, options);
    return new FlWork{work, op == kReduceAvg ? *tensor : at::Tensor(), group->world_size};
  });
}

FlWork* fl_barrier(FlProcessGroup* group, int async_op, char** error) {
  return guarded(error, [&]() -> FlWork* {
    c10d::BarrierOptions options;
    options.asyncOp = async_op != 0;
    auto work = group->backend->barrier(options);
    return new FlWork{work, at::Tensor(), group->world_size};
  });
}

// Returns 1 when the work finished, 0 on error (error set).
int fl_work_wait(FlWork* work, int64_t timeout_ms, char** error) {
  return guarded(error, [&]() -> int {
    const bool completed = work->work->wait(std::chrono::milliseconds(timeout_ms));
    if (!completed) {
      throw std::runtime_error("collective did not complete within " +
                               std::to_string(timeout_ms) + " ms");
    }
    if (work->divide_after.defined()) {
      work->divide_after.div_(work->world_size);
      work->divide_after = at::Tensor();
    }
    return 1;
  });
}

// 1 when finished (successfully or not), 0 while still running.
int fl_work_is_completed(FlWork* work, char** error) {
  return guarded(error, [&]() -> int { return work->work->isCompleted() ? 1 : 0; });
}

void fl_work_free(FlWork* work) {
  try {
    delete work;
  } catch (...) {
  }
}

}  // extern "C"
