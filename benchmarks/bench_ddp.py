"""Throughput of data-parallel LoRA fine-tuning: 1 vs N processes (gloo on CPU) on MiniLM.

Same global batch (32 x 64 tokens), LoRA r=8 on all six linear types; each process gets
``cores / N`` threads, so the comparison is at equal total compute. Per step, the only
communication is one all-reduce of the adapter gradients (331,776 floats = 1.3 MB here).
Run:  python benchmarks/bench_ddp.py [--procs 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank: int, world: int, steps: int, threads: int, init: str, out: str) -> None:
    import torch.distributed as tdist

    from benchmarks.bench_lora import ours
    from benchmarks.common import fixed_batch, minilm
    from lora_ops import distributed as dist
    from lora_ops.data import BatchSource

    torch.set_num_threads(threads)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, _ = ours(minilm(), 0.0)
    model.train()
    batch = fixed_batch()
    data = BatchSource(batch, 32, shuffle=False, rank=rank, world_size=world)
    local = next(data.batches())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    comm = 0.0
    for i in range(steps + 1):
        if i == 1:
            dist.barrier()
            start = time.perf_counter()
            comm = 0.0
        model(**local).loss.backward()
        t = time.perf_counter()
        dist.all_reduce_gradients(params)
        comm += time.perf_counter() - t
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(f"{elapsed / steps} {comm / steps} {sum(p.numel() for p in params)}")
    if world > 1:
        tdist.destroy_process_group()


def measure(world: int, steps: int) -> tuple[float, float, int]:
    cores = os.cpu_count() or 1
    out = tempfile.mktemp()
    init = tempfile.mktemp()
    args = (world, steps, max(1, cores // world), init, out)
    if world == 1:
        worker(0, *args)
    else:
        mp.spawn(worker, args=args, nprocs=world, join=True)
    step, comm, n = Path(out).read_text().split()
    return float(step), float(comm), int(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    one, _, n = measure(1, args.steps)
    many, comm, _ = measure(args.procs, args.steps)
    print(f"MiniLM LoRA r=8, global batch 32x64, {os.cpu_count()} cores, {args.steps} timed steps")
    print(f"1 process : {one * 1e3:7.0f} ms/step  {32 / one:6.1f} examples/s")
    print(f"{args.procs} processes: {many * 1e3:7.0f} ms/step  {32 / many:6.1f} examples/s  "
          f"(all-reduce {comm * 1e3:.1f} ms/step of {n * 4 / 2**20:.2f} MB adapter gradients)")
    print(f"speed-up {one / many:.2f}x")


if __name__ == "__main__":
    main()
