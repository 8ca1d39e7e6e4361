"""Per-step overhead choices, measured: OpenMP wait policy and fused AdamW, fp32 and bf16.

The step of benchmarks/profile_step.py (MiniLM, LoRA r 8 on all six linear types, batch 32 x ``--seq``,
clipping + AdamW) runs in a fresh process per variant, because libgomp reads ``OMP_WAIT_POLICY`` once
when it loads: ``PASSIVE`` (what stages/__init__.py sets today), ``ACTIVE`` (spin), and unset (libgomp's
default: spin a while, then sleep). Each variant is also run with the plain and the fused AdamW.
Variants alternate over ``--rounds`` rounds; each prints the median step time, and the table gives the
median over rounds and the ratio to the baseline measured in the same run (PASSIVE, loop AdamW).

    python benchmarks/bench_step_overhead.py --rounds 5
    python benchmarks/bench_step_overhead.py --rounds 1 --steps 3 --precisions fp32   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("PASSIVE", "ACTIVE", "unset")


def child(args: argparse.Namespace) -> None:
    import torch  # first: libgomp reads the wait policy when torch loads it

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_step import build, make_step, median_step

    torch.set_num_threads(args.threads)
    model, data = build(args.seq, args.batch, 8)
    step = make_step(model, data, args.child_precision, args.child_fused)
    for _ in range(args.warmup):
        step()
    print("RESULT " + json.dumps({"step_ms": 1e3 * median_step(step, args.steps)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--child-precision", help=argparse.SUPPRESS)
    ap.add_argument("--child-fused", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_precision:
        child(args)
        return
    variants = [(prec, pol, fused) for prec in args.precisions for pol in args.policies for fused in (False, True)]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for prec, pol, fused in variants:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
            env.pop("OMP_WAIT_POLICY", None)
            if pol != "unset":
                env["OMP_WAIT_POLICY"] = pol
            cmd = [sys.executable, __file__, "--child-precision", prec, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch), "--threads",
                   str(args.threads)] + (["--child-fused"] if fused else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{prec}/{pol}/fused={fused} failed:\n{proc.stderr[-3000:]}")
            times[(prec, pol, fused)].append(json.loads(line[-1][7:])["step_ms"])
            print(f"round {r + 1} {prec} OMP_WAIT_POLICY={pol} AdamW {'fused' if fused else 'loop'}: "
                  f"{times[(prec, pol, fused)][-1]:.1f} ms/step", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import table

    med = {v: statistics.median(t) for v, t in times.items()}
    rows = []
    for prec, pol, fused in variants:
        base = med.get((prec, "PASSIVE", False))
        rows.append((prec, pol, "fused" if fused else "loop", f"{med[(prec, pol, fused)]:.1f}",
                     f"{med[(prec, pol, fused)] / base:.3f}x" if base else "-"))
    print(f"\nbatch {args.batch} x {args.seq} tokens, {args.threads} threads, median of {args.rounds} round(s) "
          f"of the median of {args.steps} steps\n")
    print(table(rows, ("precision", "OMP_WAIT_POLICY", "AdamW", "ms/step", "x PASSIVE+loop")))


if __name__ == "__main__":
    main()
