"""Baseline for bench-recovery: the Python OpenFlamingo training step under
torch FSDP (full sharding, gloo, as bench/train_step/fsdp_reference.py sets
it up), run by `torchrun --max-restarts N` the way OpenFlamingo users run
it, with checkpoint and resume: every CHECKPOINT_STEPS steps each rank
torch.saves its shards of the trainable flat parameters and its optimizer
state (what FSDP's LOCAL_STATE_DICT holds; its loader fails on this model's
parameterless FSDP units), and
rank 0 then points `latest` at the step; a (re)started group loads
`latest` if there is one.

Rank 0 appends to OUT_DIR/log.jsonl one line per step ({attempt, step,
time}) and to OUT_DIR/attempts.jsonl one line per start ({attempt, started:
the process start, entered: Python started and its imports done, loaded:
model and checkpoint ready, step: where it resumed}). Times are Unix seconds.

usage: python torchrun_train.py OUT_DIR MODEL_DIR BATCH CHECKPOINT_STEPS MAX_STEPS
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, ShardingStrategy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../model"))
from reference import build  # noqa: E402

# Python, torch, transformers and open_flamingo are loaded.
ENTERED = time.time()

TOKENS = 32


def process_start():
    """This process's start time (Unix seconds): its age from /proc (start
    ticks since boot against the uptime, both to 10 ms) back from now."""
    with open("/proc/self/stat") as file:
        ticks = int(file.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as file:
        uptime = float(file.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def append(path, record):
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def main():
    out, model_dir = sys.argv[1], sys.argv[2]
    batch, every, max_steps = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # torchrun keeps one store across restart rounds; a plain
    # init_process_group("gloo") then finds the dead round's addresses under
    # the same keys and fails to connect (every restart failed that way
    # here). Namespacing the group's keys by the restart count avoids it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"restart-{attempt}", store),
                            rank=rank, world_size=world)
    with open(os.path.join(out, f"pid-{rank}"), "w") as file:
        file.write(str(os.getpid()))
    # Every rank builds the same seeded model (in its own folder).
    model, tokenizer, cfg, vocab = build(os.path.join(model_dir, f"rank-{rank}"), "tiny")
    model.train()
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.wrap_fsdp(dict(
        process_group=None, cpu_offload=CPUOffload(offload_params=False),
        device_id=torch.device("cpu"), sync_module_states=False,
        sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=False,
        mixed_precision=None, forward_prefetch=True,
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE, limit_all_gathers=True,
    ), torch.device("cpu"))
    parameters = [p for p in model.parameters()
                  if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.1)

    step = 0
    latest = os.path.join(out, "latest")
    if os.path.exists(latest):
        with open(latest) as file:
            step = int(file.read())
        path = os.path.join(out, f"step-{step}", f"rank-{rank}.pt")
        state = torch.load(path, weights_only=False)
        with torch.no_grad():
            for parameter, saved in zip(parameters, state["model"]):
                parameter.copy_(saved)
        optimizer.load_state_dict(state["optim"])
    if rank == 0:
        append(os.path.join(out, "attempts.jsonl"), {
            "attempt": attempt, "started": process_start(), "entered": ENTERED,
            "loaded": time.time(), "step": step})

    media = tokenizer.convert_tokens_to_ids("<image>")
    generator = torch.Generator().manual_seed(3 + rank)
    ids = torch.randint(0, vocab, (batch, TOKENS), generator=generator)
    ids[:, 0] = media
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[labels == media] = -100
    vision_x = torch.randn(batch, 1, 1, 3, cfg["image"], cfg["image"], generator=generator)
    while step < max_steps:
        loss = model(vision_x=vision_x, lang_x=ids, attention_mask=mask, labels=labels)[0]
        loss.backward()
        model.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            append(os.path.join(out, "log.jsonl"), {"attempt": attempt, "step": step, "time": time.time()})
        if step % every == 0:
            folder = os.path.join(out, f"step-{step}")
            os.makedirs(folder, exist_ok=True)
            state = {"model": [p.detach() for p in parameters], "optim": optimizer.state_dict()}
            torch.save(state, os.path.join(folder, f"rank-{rank}.pt"))
            dist.barrier()
            if rank == 0:
                with open(latest + ".tmp", "w") as file:
                    file.write(str(step))
                os.replace(latest + ".tmp", latest)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
