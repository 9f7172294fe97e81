"""
Several processes, one run: the small helpers train.py needs under torchrun.

    torchrun --standalone --nproc_per_node=2 train.py --preset=tiny     # 2 processes (GPUs, or CPU with gloo)

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE. Every process runs the same
train.py: training steps split each global batch across the processes (DistributedDataParallel averages the
gradients), sampling splits the contexts and gathers the replies, and only rank 0 writes files. Without
torchrun the world is one process, and every helper here returns its input unchanged.
"""

import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from harness.configurator import ConfigError


def setup(device):
    """Join the process group when started by torchrun (nccl on CUDA, gloo on CPU) and return this process's
    device: cuda:LOCAL_RANK under torchrun on CUDA, else `device`. On CUDA also allow TF32 for the float32
    matmuls that autocast leaves in float32 (a free speed-up on Ampere and later). Ranks other than 0 print
    nothing (rank 0 prints for all; errors still reach stderr)."""
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)  # nccl (and all_gather_object) use the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if not is_main():
            sys.stdout = open(os.devnull, "w")
    return device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Rank 0: the process that prints the tables and writes the files."""
    return rank() == 0


def barrier():
    """Wait for every process (after rank 0 wrote a file the others read next)."""
    if dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """fn() on rank 0 first (it may write a file: the tokenizer, say), then on the others, which find it."""
    if not is_main():
        barrier()
    result = fn()
    if is_main():
        barrier()
    return result


def check_batches(batch_size, grad_accum, pref_batch_size):
    """Under torchrun (WORLD_SIZE processes, read before joining them): every process needs at least one
    window per piece, and an equal share of the triplets (the step's metrics average the shares' means)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size < world * grad_accum or pref_batch_size % world:
        raise ConfigError(f"with {world} processes --batch_size needs at least {world} x --grad_accum "
                          f"windows and --pref_batch_size a multiple of {world}")


def split(items):
    """This process's share of a list: contiguous pieces in rank order, the first ones one item longer when
    the list does not divide evenly. gather() of every rank's share is the list again, in its order."""
    n, world = len(items), world_size()
    return items[rank() * n // world:(rank() + 1) * n // world]


def gather(items):
    """Every process's list, concatenated in rank order (each process gets the whole list)."""
    if not dist.is_initialized():
        return list(items)
    pieces = [None] * world_size()
    dist.all_gather_object(pieces, list(items))
    return [x for piece in pieces for x in piece]


def wrap(model, device):
    """DistributedDataParallel(model) under torchrun: the backward pass averages the gradients over the
    processes (and the wrapper broadcasts rank 0's weights once, so every process starts equal)."""
    if not dist.is_initialized():
        return model
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def micro_batches(model, x, y, grad_accum=1):
    """This process's rows of the global batch (x, y), in grad_accum pieces, each with a weight: the summed
    gradients of weight x (a piece's mean loss) are those of the global batch's mean loss. A piece's loss is a
    mean over its own target tokens (not -1), so weight = its tokens / the global batch's tokens x world size
    (DDP divides the summed gradients by the world size); one process, one piece: weight 1. The caller's
    forward and backward run inside the loop, where DDP is told to average the gradients over the processes
    once per step, after the last piece, not after every piece."""
    rows = split(range(x.size(0)))
    pieces = [rows[i * len(rows) // grad_accum:(i + 1) * len(rows) // grad_accum] for i in range(grad_accum)]
    total = max(int((y != -1).sum()), 1)
    for i, piece in enumerate(pieces):
        xs, ys = x[piece.start:piece.stop], y[piece.start:piece.stop]
        last = i == len(pieces) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            yield xs, ys, int((ys != -1).sum()) / total * world_size()


def _all_reduce_floats(values, op=None):
    # nccl reduces GPU tensors only
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def sum_over_processes(value):
    """A float summed over the processes (a global number from per-process parts, for the log)."""
    return _all_reduce_floats([value])[0] if dist.is_initialized() else value


def mean_over_processes(row):
    """A dict of floats, each averaged over the processes: the per-step metrics of the global batch, from
    each process's equal share of it (every one is a mean over the rows)."""
    if not dist.is_initialized():
        return row
    return dict(zip(row, [v / world_size() for v in _all_reduce_floats(row.values())]))


def average_gradients(model):
    """Each gradient averaged over the processes: what DistributedDataParallel does during backward, done
    after it. The preference stage does it so: its diagnostics take gradients with torch.autograd.grad
    (evaluate.gradient_by_reply), which DDP's backward hooks are not made for."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
