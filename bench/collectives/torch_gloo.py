"""Baseline rank for bench-collectives: the same sweep through PyTorch's own
torch.distributed gloo backend. Started by bench-collectives with torchrun's
environment; rank 0 prints one JSON object per (op, size)."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist


BLOCKS = 5  # as in main.rs: the fastest block's slowest-rank mean counts


def time_op(iterations, op):
    op()  # warm-up
    op()
    best = float("inf")
    for _ in range(BLOCKS):
        dist.barrier()
        started = time.perf_counter()
        for _ in range(iterations):
            op()
        mean = (time.perf_counter() - started) / iterations
        slowest = torch.tensor([mean], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        best = min(best, slowest.item())
    return best


def main():
    sizes = [int(size) for size in sys.argv[1].split(",")]
    ops = sys.argv[2].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    world = dist.get_world_size()
    rank = dist.get_rank()
    settle = torch.ones(1 << 18)  # as in main.rs: 50 × 1 MiB all-reduce first
    for _ in range(50):
        dist.all_reduce(settle)
    dist.barrier()
    for op_name in ops:
        for size in sizes:
            count = max((size // 4) // world, 1) * world
            iterations = int(os.environ["BENCH_ITERATIONS_" + str(size)])
            if op_name == "all_reduce":
                buffer = torch.ones(count)
                seconds = time_op(iterations, lambda: dist.all_reduce(buffer))
            elif op_name == "all_gather":
                shard = torch.ones(count // world)
                output = torch.empty(count)
                seconds = time_op(iterations, lambda: dist.all_gather_into_tensor(output, shard))
            else:
                full = torch.ones(count)
                output = torch.empty(count // world)
                seconds = time_op(iterations, lambda: dist.reduce_scatter_tensor(output, full))
            if rank == 0:
                print(json.dumps({"op": op_name, "bytes": count * 4, "seconds": seconds}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
