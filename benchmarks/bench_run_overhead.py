"""Where a default ``dvc repro`` spends its wall time: stage by stage, against the training loop.

Clones the committed code (HEAD) beside the repository, so ``../shared`` resolves as in a fresh
checkout, and runs ``dvc repro`` there from nothing: every stage runs, the MLflow store is created on
first use, as a new user's first run. Each line of DVC's output is time-stamped; a stage's wall time
runs from its "Running stage" line to the next one (DVC's own hashing and lock-file update
included). Then, in the same clone:

- each stage module's import time alone (``python -c "import stages.<stage>"``, the floor every stage
  process pays before it does any work);
- a no-op ``dvc repro`` (target: at most 2 s).

Issue 24's target: the training loop (``finetune``'s reported seconds) is at least 60 % of the run.
Run it on a quiet machine; the numbers are wall-clock and change with load.

    python benchmarks/bench_run_overhead.py --out benchmarks/results/bench_run_overhead.md
    python benchmarks/bench_run_overhead.py --set train.precision=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common.params import set_dotted  # noqa: E402

STAGE_LINE = re.compile(r"(Running stage|Stage) '([^']+)'")


def timed_repro(clone: Path, env: dict[str, str], log: Path) -> tuple[float, list[tuple[str, float, bool]]]:
    """Runs ``dvc repro`` in ``clone``; returns its wall seconds and (stage, start offset, ran) per stage."""
    start = time.perf_counter()
    stages: list[tuple[str, float, bool]] = []
    with subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc, log.open("w") as sink:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            sink.write(f"{now:8.2f} {line}")
            m = STAGE_LINE.search(line)
            if m:
                stages.append((m.group(2), now, m.group(1) == "Running stage"))
        code = proc.wait()
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"bench_run_overhead: dvc repro failed (exit {code}); see {log}")
    return wall, stages


def import_seconds(clone: Path, env: dict[str, str], stage: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import stages.{stage}"], cwd=clone, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml override for the measured run (dotted key)")
    ap.add_argument("--out", help="also write the report here (markdown)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args(argv)
    overrides = []
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.precision=bf16")
        overrides.append((key, raw))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    clone = ROOT.parent / f".bench-run-overhead-{os.getpid()}"  # beside the repo: ../shared resolves
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the clone's own, new store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        if overrides:
            params_file = clone / "params.yaml"
            tree = yaml.safe_load(params_file.read_text())
            for key, raw in overrides:
                set_dotted(tree, key, yaml.safe_load(raw))
            params_file.write_text(yaml.safe_dump(tree, sort_keys=False))
        wall, stages = timed_repro(clone, env, clone / "bench-repro.log")
        summary = json.loads((clone / "data/finetune/summary.json").read_text())
        train = float(summary["seconds"])
        noop_start = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
        noop = time.perf_counter() - noop_start
        ran = [(name, at) for name, at, did_run in stages if did_run]
        bounds = [at for _, at in ran] + [wall]
        imports = {name: import_seconds(clone, env, name) for name, _ in ran}
    finally:
        if not args.keep:
            shutil.rmtree(clone, ignore_errors=True)

    settings = ", ".join(f"{k}={v}" for k, v in overrides) or "default params"
    lines = [f"## `dvc repro` from nothing, {settings} (commit {commit}, "
             f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads, {os.cpu_count()} CPUs)", "",
             "| stage | wall s | share of run | import alone s |", "|---|---:|---:|---:|"]
    for i, (name, at) in enumerate(ran):
        seconds = bounds[i + 1] - at
        lines.append(f"| {name} | {seconds:.1f} | {seconds / wall:.0%} | {imports[name]:.1f} |")
    before = ran[0][1] if ran else wall
    lines += [f"| (DVC start-up, skipped stages) | {before:.1f} | {before / wall:.0%} | |",
              f"| **run** | **{wall:.1f}** | | {sum(imports.values()):.1f} |", "",
              f"- training loop (finetune's {summary['steps']} steps, {summary.get('processes', 1)} process): "
              f"{train:.1f} s = **{train / wall:.0%} of the run** (target >= 60 %)",
              f"- outside the training loop: {wall - train:.1f} s, of which module imports alone "
              f"{sum(imports.values()):.1f} s over {len(ran)} stage processes",
              f"- no-op `dvc repro`: {noop:.2f} s (target <= 2 s)", ""]
    report = "\n".join(lines)
    print(report)
    if args.keep:
        print(f"clone kept: {clone}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        head = "" if out.exists() else ("# `bench_run_overhead.py`: a default run's wall time, stage by stage\n\n"
                                        "Each section is one run of the command above it (appended).\n\n")
        with out.open("a") as f:
            f.write(head + f"`python benchmarks/bench_run_overhead.py{''.join(' --set ' + s for s in args.set)}`"
                           "\n\n" + report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
