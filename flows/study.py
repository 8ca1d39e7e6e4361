"""The method study: methods x tasks x seeds, each method with its own recipe and a small learning-rate
sweep chosen on the validation split, all at the same budget in training examples.

For every (task, method): the sweep runs the first seed at ``lr_factors`` x the method's recipe
learning rate (its ``recipe.lr``, or ``train.lr`` where the recipe says null); the factor with the
best *validation* score is kept (ties: the one nearest the recipe's own value) and the remaining
seeds run at it. The dev split is only reported. Every run is one :func:`flows.pipeline.pipeline`
run, saved as a DVC experiment, so a rerun of the study (same params, same code) is restored from
DVC's run cache instead of trained again. Outputs::

    reports/study.csv          every run, sweep included (column ``selected``), with its git commit and params hash
    reports/predictions.parquet  every run's per-example dev predictions (flows.paired)
    reports/study.md           mean ± std over seeds per task and method, the sweep, the paired differences
                               (hierarchical bootstrap by seed, then dev example) and the papers' targets
                               (met / not met / inconclusive, Holm-corrected)
    reports/study_pareto.png   dev metric against stored adapter parameters, one point per method

    python -m flows.study --methods lora lora_drop bone bat dora_dr adalora blora --seeds 1 2 3 \\
        -S data.train_size=2000 -S train.epochs=3

Sequential protocol: ``--extend-inconclusive reports/study.csv`` runs only the new seeds (five more, up to
10) of the (task, method) pairs behind its inconclusive verdicts (the papers' and the compress targets, a
row against the LoRA-by-rank frontier point at its size; both sides of each), at the lr factor each pair's
sweep chose; every earlier row and prediction is kept (as ``--append``), so nothing earlier is rerun.
Before it starts, the study prints its estimated CPU time (:func:`estimate_seconds`); ``--estimate`` prints
only that and runs nothing.

The MLflow report run holds the files (its description points to them); the flow run carries the report as a
Prefect markdown artifact and every run as a row of a table artifact (``lora-sieve-study-<deployment>-summary``
/ ``-runs``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger

from flows import cost, frontier, paired
from flows.pipeline import EXIT_BAD_INPUT, ROOT, parse_override, pipeline, validate_overrides
from flows.report import log_report_run, publish_report
from flows.study_report import COLUMNS, columns_of, markdown, pareto_chart, summary, targets
from flows.variants import parse_variant, training_label
from lora_ops.methods import get_method
from lora_ops.methods.base import reference_method
from stages.common.io import atomic_path
from stages.common.params import ConfigError, Params
from stages.common.paths import Paths
from stages.common.tracking import git_commit, short_commit

#: the rough cost of a run where no earlier study measured one: seconds per optimizer step (MiniLM, batch 32,
#: 2 CPU cores: 58 s for 189 steps in the December study) and the other stages of one run (a default run spends
#: 112 s outside its training loop, 22 s of it in the compress search: benchmarks/bench_run_overhead.py)
ROUGH_STEP_SECONDS = 0.3
STAGE_OVERHEAD_SECONDS = 90.0


def params_hash(params: Params) -> str:
    """A run's full validated params, hashed: two rows with the same hash ran the same configuration."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_lr(params: Params) -> float:
    """The adapter learning rate the selected method trains at: its recipe's, else ``train.lr``."""
    recipe = params.method_params().recipe
    return recipe.lr if recipe.lr is not None else params.train.lr


def scaled(lr: float, factor: float) -> float:
    """``lr * factor`` to three significant digits (a readable value in params and experiment names)."""
    return float(f"{lr * factor:.3g}")


def study_row(result: dict[str, Any], params: Params, lr: float, factor: float, label: str | None = None
              ) -> dict[str, Any]:
    m, ft = result["metrics"], result.get("finetune") or {}
    ratio = m.get("trainable_ratio_to_lora")
    method = get_method(params.method.name)
    own = method.report_figures(ft.get("controller"), params.method_params())
    figures = {k: own[k] if k in own else m.get(k) for k in method.figure_labels}
    return {
        "task": params.task.name, "method": label or params.method.name, "seed": params.seed, "lr": lr, "lr_factor": factor,
        "selected": False, "metric": m.get("main_metric", "score"), "score": m.get("score"),
        "validation_score": m.get("best_validation"), "trivial_score": m.get("trivial_score"),
        "trainable_params": m.get("trainable_params"), "stored_params": m.get("stored_params"),
        "pct_of_lora": None if ratio is None else 100 * ratio, **figures,
        "train_seconds": m.get("train_seconds", ft.get("seconds")), "peak_rss_mb": ft.get("peak_rss_mb"),
        "peak_cuda_mb": ft.get("peak_cuda_mb"), "trained": result.get("stages", {}).get("finetune") == "ran",
        "experiment": result.get("experiment"),
        "mlflow_run_id": result.get("mlflow_run_id"), "params_hash": params_hash(params),
        # what the compress stage stored (codes + scales + head): the axis the LoRA-by-rank frontier is drawn on
        "stored_bytes": m.get("stored_bytes"),
        "pct_bytes_of_lora_fp32": None if m.get("stored_bytes_ratio_to_lora_fp32") is None
        else 100 * m["stored_bytes_ratio_to_lora_fp32"],
        "compress_components": m.get("compress_components"), "compress_bits": m.get("compress_bits"),
        # a structurally pruned base (LoRAPrune): merged parameters over the dense model's; a column only where
        # some row has it (columns_of), so earlier study.csv layouts stay as they were
        **({"params_ratio_to_dense": m["params_ratio_to_dense"]} if "params_ratio_to_dense" in m else {}),
    }


def with_earlier_rows(df: pd.DataFrame, earlier: pd.DataFrame,
                      extended: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """``earlier`` rows first (without the (task, method) pairs ``df`` has run again), then ``df``'s. A pair in
    ``extended`` (the sequential protocol's new seeds) keeps its earlier rows, less any run ``df`` has again."""
    for column in ("git", "params_hash"):
        if column not in earlier.columns:
            earlier = earlier.assign(**{column: None})
    keep = earlier[paired.not_rerun(earlier, df, extended)]
    columns = list(dict.fromkeys([*COLUMNS, *earlier.columns, *df.columns]))
    out = pd.concat([keep.reindex(columns=columns), df.reindex(columns=columns)], ignore_index=True)
    out["selected"] = out["selected"].astype(str).str.lower().isin(["true", "1"])
    return out


def exp_name(task: str, label: str, seed: int, lr: float, stamp: str) -> str:
    """A DVC experiment name (letters, digits, - and _ only) for one study run."""

    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"study-{task}-{label}-s{seed}-lr{lr:g}-{stamp}").strip("-")


def sweep_order(seeds: list[int], factors: list[float], sweep_seeds: int) -> tuple[list[tuple[int, float]], list[int]]:
    """One (task, method)'s runs: the sweep (each factor on each of the first ``sweep_seeds`` seeds, factor by
    factor) and the seeds left to run at the chosen factor."""
    return [(s, f) for f in factors for s in seeds[:sweep_seeds]], seeds[sweep_seeds:]


def choose_factor(sweep: list[dict[str, Any]]) -> float:
    """The factor with the best mean validation score over the sweep's seeds; ties go to the factor nearest 1
    (the recipe)."""
    by_factor: dict[float, list[float]] = {}
    for r in sweep:
        by_factor.setdefault(float(r["lr_factor"]), []).append(float(r["validation_score"]))
    return max(by_factor, key=lambda f: (sum(by_factor[f]) / len(by_factor[f]), -abs(math.log(f))))


# ----------------------------------------------------------------------------- flow
@dataclass(frozen=True)
class PlannedRun:
    """One run a study will make. ``factor`` is its lr factor, or None for a seed that runs at the factor its
    sweep will choose."""

    task: str
    label: str
    seed: int
    factor: float | None
    params: Params

    def training(self) -> tuple[str, str, int, float | None]:
        """The training it needs: a ``+compress`` row trains what its method's row trains (same seed and lr)."""
        return self.task, training_label(self.label), self.seed, self.factor


def estimate_seconds(runs: list[PlannedRun], earlier: pd.DataFrame | None) -> tuple[float, str]:
    """CPU seconds the study's runs should take at most, and how that was estimated. Each distinct training
    (:meth:`PlannedRun.training`) is counted once, at the mean ``train_seconds`` an earlier study.csv measured
    for its (task, training row), else for its task, else ``ROUGH_STEP_SECONDS`` per optimizer step. Every run
    adds its other stages: the median seconds beside training of the earlier runs that trained
    (:func:`flows.cost.beside_training`, as the report's Cost section counts it), else
    ``STAGE_OVERHEAD_SECONDS``; a run whose training another run of the plan makes (a ``+compress`` row) adds
    only those. Trainings DVC's run cache already has cost next to nothing: the estimate is an upper bound."""
    measured: dict[tuple[str, str], float] = {}
    by_task: dict[str, float] = {}
    overhead = STAGE_OVERHEAD_SECONDS
    overhead_measured = False
    if earlier is not None and "train_seconds" in earlier.columns and len(earlier):
        secs = earlier.assign(train_seconds=pd.to_numeric(earlier["train_seconds"], errors="coerce"))
        secs = secs.dropna(subset=["train_seconds"])
        labels = secs["method"].map(lambda m: training_label(str(m)))
        measured = {(str(t), str(m)): float(v) for (t, m), v in secs.groupby([secs["task"], labels])["train_seconds"]
                    .mean().items()}
        by_task = {str(t): float(v) for t, v in secs.groupby("task")["train_seconds"].mean().items()}
        rest = cost.beside_training(secs)
        if len(rest):
            overhead, overhead_measured = float(rest.median()), True
    total, counts, trained = 0.0, {"measured": 0, "rough": 0}, set()
    for run in runs:
        if run.training() in trained:
            total += overhead
            continue
        trained.add(run.training())
        seconds = measured.get((run.task, training_label(run.label)), by_task.get(run.task))
        if seconds is None:
            p = run.params
            seconds = ROUGH_STEP_SECONDS * p.train.epochs * math.ceil(p.data.train_size / p.train.batch_size)
            counts["rough"] += 1
        else:
            counts["measured"] += 1
        total += seconds + overhead
    shared = len(runs) - len(trained)
    how = (f"{len(trained)} trainings: {counts['measured']} at the times an earlier study.csv measured, "
           f"{counts['rough']} at ~{ROUGH_STEP_SECONDS} s per optimizer step (MiniLM on 2 cores); plus ~{overhead:.0f} s per run for the "
           f"other stages{' (as earlier runs measured)' if overhead_measured else ''}"
           + (f"; {shared} runs reuse a training of the plan" if shared else "")
           + "; runs in DVC's run cache cost next to nothing")
    return total, how


def shown_path(path: str | Path, root: Path) -> str:
    """A path as a report may print it (no machine paths): relative to the repository; in another checkout of
    this project (a folder with ``.git`` and ``flows/study.py``), ``<checkout>/`` and the path inside it; else
    the file's name."""
    resolved, root = Path(path).resolve(), Path(root).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        pass
    for parent in resolved.parents:
        if (parent / ".git").exists() and (parent / "flows" / "study.py").is_file():
            return f"<checkout>/{resolved.relative_to(parent).as_posix()}"
    return resolved.name


def shown_command(argv: list[str], root: Path) -> str:
    """The study's command line as a report prints it: absolute paths (an argument, or the value after its
    ``=``) as :func:`shown_path` shows them, each argument quoted where the shell needs it. It runs as printed
    from the repository root when every path in it is inside the repository."""
    def shown(arg: str) -> str:
        key, eq, value = arg.rpartition("=")
        if eq and Path(value).is_absolute():
            return f"{key}={shown_path(value, root)}"
        return shown_path(arg, root) if Path(arg).is_absolute() else arg
    return shlex.join(["python", "-m", "flows.study", *(shown(a) for a in argv)])


def earlier_rows(append: str | None, root: Path, out_dir: str) -> pd.DataFrame | None:
    """The study.csv a study grows (``--append``'s, else the one in its output folder), if there is one."""
    csv = Path(append) if append else root / out_dir / "study.csv"
    return pd.read_csv(csv) if csv.is_file() else None


def earlier_predictions(csv: str | Path) -> pd.DataFrame:
    """The predictions file beside an earlier study.csv (empty when that study kept none)."""
    return paired.read(Path(csv).with_name("predictions.parquet"))


def write_report(out: Path, df: pd.DataFrame, preds: pd.DataFrame, header: str, command: str,
                 draws: int = paired.DRAWS) -> tuple[list[Path], str]:
    """``out``/study.{md,csv}, the chart and the predictions of a study; the files and the markdown. Each row's
    interval is bootstrapped once, for the table and the chart."""
    files = [out / "study.md", out / "study.csv", out / "study_pareto.png", out / "predictions.parquet"]
    intervals = paired.intervals(summary(df), paired.selected(df, preds), draws)
    report = markdown(df, header, command, preds, draws, intervals)
    with atomic_path(files[1]) as tmp:
        df.to_csv(tmp, index=False)
    paired.write(files[3], preds)
    with atomic_path(files[0]) as tmp:
        tmp.write_text(report)
    pareto_chart(df, files[2], preds, draws, intervals)
    return files, report


@dataclass
class StudyPlan:
    """What a study will run, validated before anything runs: ``plan`` is (task, row label, seeds, lr factors)
    per (task, method) pair; ``checked`` the validated params of each pair's first run."""

    root: Path
    base: dict[str, Any]
    plan: list[tuple[str | None, str, list[int], list[float]]]
    variants: dict[str, tuple[str, str, dict[str, Any]]]
    checked: dict[tuple[str | None, str], Params]
    methods: list[str]
    seeds: list[int]
    factors: list[float]
    sweep_seeds: int

    def overrides_for(self, task: str | None, spec: str, seed: int, factor: float = 1.0,
                      base_lr: float = 0.0) -> dict[str, Any]:
        _, method, settings = self.variants[spec]
        o = {**self.base, **settings, "method.name": method, "seed": seed}
        if task is not None:
            o["task.name"] = task
        if factor != 1.0:  # factor 1 is the recipe as written: same params, so DVC's cache serves earlier runs
            o[f"{method}.recipe.lr"] = scaled(base_lr, factor)
        return o

    def runs(self) -> list[PlannedRun]:
        """Every run, in order: each pair's sweep (seed x factor), then its other seeds at the chosen factor."""
        out = []
        for t, m, ss, fs in self.plan:
            p = self.checked[(t, m)]
            sweep, rest = sweep_order(ss, fs, self.sweep_seeds)
            chosen = fs[0] if len(fs) == 1 else None
            out += [PlannedRun(p.task.name, self.variants[m][0], s, f, p) for s, f in sweep]
            out += [PlannedRun(p.task.name, self.variants[m][0], s, chosen, p) for s in rest]
        return out

    def estimate_line(self, earlier: pd.DataFrame | None) -> str:
        runs = self.runs()
        seconds, how = estimate_seconds(runs, earlier)
        return f"study: {len(runs)} runs, estimated CPU time at most {seconds / 3600:.2f} h ({how})"


def study_plan(methods: list[str], seeds: list[int], tasks: list[str] | None, lr_factors: list[float] | None,
               overrides: dict[str, Any] | None, root: Path, pairs: list[dict[str, Any]] | None = None,
               sweep_seeds: int = 1) -> StudyPlan:
    """The runs of a study (see :func:`study`), every pair's params validated: a bad label or override fails
    here, before anything runs."""
    if sweep_seeds < 1:
        raise ConfigError(f"sweep_seeds must be >= 1, got {sweep_seeds}")
    base = {**(overrides or {}), "registry.enabled": False}  # a study must not move the champion
    if pairs is None:
        if not methods or not seeds:
            raise ConfigError("a study needs at least one method and one seed")
        factors = sorted(set(lr_factors or [1.0]))
        plan = [(t, m, list(seeds), factors) for t in (tasks or [None]) for m in methods]
    else:
        plan = [(p.get("task"), str(p["method"]), [int(x) for x in p["seeds"]],
                 sorted({float(f) for f in p.get("lr_factors") or [1.0]})) for p in pairs]
        methods = list(dict.fromkeys(m for _, m, _, _ in plan))
        seeds = sorted({x for _, _, ss, _ in plan for x in ss})
        factors = sorted({f for *_, fs in plan for f in fs})
    if not plan or any(not ss for _, _, ss, _ in plan):
        raise ConfigError("a study needs at least one method and one seed")
    if any(f <= 0 for *_, fs in plan for f in fs):
        raise ConfigError(f"lr factors must be > 0, got {factors}")
    sp = StudyPlan(root, base, plan, {spec: parse_variant(spec) for _, spec, _, _ in plan}, {}, list(methods),
                   list(seeds), factors, sweep_seeds)
    sp.checked = {(t, m): validate_overrides(root, sp.overrides_for(t, m, ss[0])) for t, m, ss, _ in plan}
    return sp


@flow(name="lora-sieve-study", log_prints=True)
def study(methods: list[str], seeds: list[int], tasks: list[str] | None = None,
          lr_factors: list[float] | None = None, overrides: dict[str, Any] | None = None, repo: str = str(ROOT),
          out_dir: str = "reports", retries: int = 2, command: str = "", append: str | None = None,
          pairs: list[dict[str, Any]] | None = None, sweep_seeds: int = 1) -> dict[str, Any]:
    """Sweep, then seeds, for every (task, method); write ``<out_dir>/study.{md,csv}``, the runs' per-example
    predictions (``predictions.parquet``) and the Pareto chart.

    ``append``: an earlier ``study.csv`` whose rows (and predictions, from the ``predictions.parquet`` beside it)
    are kept, except those of the (task, method) pairs run now; every row carries the git commit it ran at and
    its params hash, so the report says which code and configuration made it. ``pairs``: instead of
    ``tasks`` x ``methods`` x ``seeds``, the pairs to run, each ``{"task", "method", "seeds", "lr_factors"}``
    (the sequential protocol's extension). ``sweep_seeds``: how many of the first seeds run every lr factor; the
    factor with the best mean validation score over them is chosen (ties: nearest the recipe)."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    sp = study_plan(methods, seeds, tasks, lr_factors, overrides, root, pairs, sweep_seeds)
    plan, variants, checked, base = sp.plan, sp.variants, sp.checked, sp.base
    methods, seeds, factors = sp.methods, sp.seeds, sp.factors
    overrides_for = sp.overrides_for
    print(sp.estimate_line(earlier_rows(append, root, out_dir)))
    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []  # the pipeline results of rows, in order (the Prefect artifacts)
    frames: list[pd.DataFrame | None] = []  # each run's per-example predictions
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def run(task: str | None, spec: str, seed: int, factor: float, base_lr: float) -> dict[str, Any]:
        label = variants[spec][0]
        lr = scaled(base_lr, factor)
        o = overrides_for(task, spec, seed, factor, base_lr)
        p = validate_overrides(root, o)
        name = exp_name(p.task.name, label, seed, lr, stamp)
        started = time.perf_counter()
        results.append(pipeline(overrides=o, repo=str(root), experiment_name=name, retries=retries))
        row = study_row(results[-1], p, lr, factor, label)
        row["run_seconds"] = time.perf_counter() - started  # what the CPU estimate of a later study reads
        frames.append(paired.run_predictions(root / Paths.predictions, row))  # before the next run replaces it
        return row

    for task, spec, pair_seeds, pair_factors in plan:
        p0 = checked[(task, spec)]
        label = variants[spec][0]
        base_lr = recipe_lr(p0)
        sweep_runs, rest = sweep_order(pair_seeds, pair_factors, sweep_seeds)
        sweep = []
        for seed, f in sweep_runs:
            sweep.append(run(task, spec, seed, f, base_lr))
            logger.info("%s %s seed %d lr %.2e: validation %.4f, dev %.4f", p0.task.name, label, seed,
                        sweep[-1]["lr"], sweep[-1]["validation_score"], sweep[-1]["score"])
        chosen = choose_factor(sweep) if len(pair_factors) > 1 else pair_factors[0]
        for r in sweep:
            r["selected"] = r["lr_factor"] == chosen
        rows += sweep
        for seed in rest:
            r = run(task, spec, seed, chosen, base_lr)
            r["selected"] = True
            rows.append(r)
        logger.info("%s %s: lr factor %g chosen on validation", p0.task.name, label, chosen)
    commit = short_commit(git_commit(root))
    for r in rows:
        r["git"] = commit
    df = pd.DataFrame(rows, columns=columns_of(rows))
    preds = paired.combine(frames)
    ran = set(zip(df["task"], df["method"]))
    extended = {(checked[(p.get("task"), str(p["method"]))].task.name, variants[str(p["method"])][0])
                for p in pairs or [] if p.get("extends")}  # the sequential protocol's pairs: earlier seeds kept
    if append:
        df = with_earlier_rows(df, pd.read_csv(append), extended)
        preds = paired.with_earlier(preds, earlier_predictions(append), extended)
    out = root / out_dir
    p0 = next(iter(checked.values()))
    header = study_header(base_params(root, base, plan[0][0]), seeds, factors,
                          list(dict.fromkeys(str(c) for c in df["git"].dropna())), sweep_seeds)
    if append:
        kept = sorted(set(df["method"]) - {m for _, m in ran - extended})
        header += (f" Rows of {', '.join(kept)} kept from `{shown_path(append, root)}` (columns `git` and "
                   f"`params_hash` of study.csv: the commit and configuration each row ran at); ")
        header += (f"the rows of {', '.join(methods)} ran now." if not extended else
                   "the sequential protocol's new seeds ran now: " + "; ".join(
                       f"{m} seeds {', '.join(map(str, ss))}" for _, m, ss, _ in plan) + ".")
    files, report = write_report(out, df, preds, header, command or "python -m flows.study ...")
    run_id = log_report_run(root, p0.tracking.experiment, files, df[df["selected"]], kind="study", tags={
                         "study": "true", "methods": ",".join(methods), "seeds": ",".join(map(str, seeds)),
                          "overrides": json.dumps(base, default=str)[:5000]})
    artifacts = publish_report(root, "study", report, results, rows, run_id)
    print(report)
    return {"rows": rows, "files": [str(f) for f in files], "mlflow_run_id": run_id, "artifacts": artifacts}


def base_params(root: Path, overrides: dict[str, Any], task: str | None) -> Params:
    """The configuration every row of a study shares: params.yaml with the study-wide overrides, without any
    row's own method settings (a row's label says those)."""
    return validate_overrides(root, {**overrides, **({"task.name": task} if task else {})})


def study_header(p: Params, seeds: list[int], factors: list[float], commits: list[str], sweep_seeds: int = 1) -> str:
    """The report's first paragraph: the shared configuration, seeds, lr factors and the commits rows ran at."""
    shown = ", ".join(short_commit(c) for c in commits) or "unknown"
    return (f"# Method study\n\nModel `{p.model.name}`, {p.data.train_size} training examples "
            f"(validation {p.data.validation_size} carved from train), {p.train.epochs} epochs, batch "
            f"{p.train.batch_size}, train precision {p.train.precision}; unless a row's label says otherwise, "
            f"adapter rank {p.adapter.rank} on `{p.adapter.targets}`; seeds {seeds}; lr factors {factors} of each method's recipe lr, chosen on "
            f"validation with {'the first seed' if sweep_seeds == 1 else f'the mean of the first {sweep_seeds} seeds'}. Dev metric = the full dev split, never used for a choice. "
            f"Rows ran at git {shown}; drawn {time.strftime('%Y-%m-%d')}.")


def unknown_label(only: list[str] | None, df: pd.DataFrame, what: str) -> None:
    """A ConfigError naming the first ``--methods`` label that is no row of ``df`` (``what`` says where)."""
    missing = sorted(set(only or []) - set(df["method"]))
    if missing:
        raise ConfigError(f"--methods {missing[0]!r} {what}")


def extension_pairs(csv: str | Path, max_seeds: int = paired.MAX_SEEDS,
                    only: list[str] | None = None) -> list[dict[str, Any]]:
    """The sequential protocol's next step for an earlier study: the (task, method) pairs behind its
    inconclusive verdicts (the papers' and the compress targets, and a row against the LoRA-by-rank frontier
    point at its size; :func:`flows.paired.extension`), each with only its *new* seeds, at the lr factor its
    sweep chose (the choice rests on the sweep seeds, which stay as they are), so the earlier runs are neither
    rerun nor needed in DVC's cache. Each pair is marked ``extends``: its earlier rows and predictions are kept
    beside the new ones. Raises ConfigError when a pair to extend lacks the per-example predictions of a
    selected run (its difference could not be paired on those seeds). With ``only`` (row labels), just those
    rows: checkouts side by side each take a share of one step, merged afterwards by ``--report``."""
    df = pd.read_csv(csv)
    df["selected"] = df["selected"].astype(str).str.lower().isin(["true", "1"])
    unknown_label(only, df, f"is not a row of {csv}")
    preds = paired.selected(df, earlier_predictions(csv))
    s = summary(df)
    checks: list[paired.TargetCheck | paired.Undecided] = [
        *targets(s, preds), *frontier.compress_targets(s, preds, parse_variant, reference_method())]
    # "above the frontier" is a verdict too: the row against the frontier point at its size
    checks += [paired.Undecided(p.task, p.label, p.at_size.label)
               for p in frontier.place(s, preds, parse_variant, reference_method())
               if p.at_size is not None and p.verdict == paired.INCONCLUSIVE]
    plan = paired.extension(df, checks, max_seeds)
    have = set(zip(preds["task"], preds["method"], preds["seed"].astype(int))) if not preds.empty else set()
    out = []
    for (task, label), seeds in plan.items():
        if only is not None and label not in only:  # another checkout's share
            continue
        factor, earlier = chosen_runs(df[(df["task"] == task) & (df["method"] == label)], task, label)
        lacking = [x for x in earlier if (task, label, x) not in have]
        if lacking:
            raise ConfigError(f"{task} {label}: no per-example predictions for seed {lacking[0]} beside {csv}; "
                              f"make them first with --restore-predictions {csv} --out {Path(csv).parent}")
        new_seeds = [x for x in seeds if x not in earlier]
        if new_seeds:
            out.append({"task": task, "method": label, "seeds": new_seeds, "lr_factors": [factor], "extends": True})
    return out


def chosen_runs(g: pd.DataFrame, task: str, label: str) -> tuple[float, list[int]]:
    """The lr factor and the seeds of one (task, method)'s selected runs (``g``: its rows with ``selected``
    already boolean); a ConfigError when they ran at more than one factor."""
    chosen = g[g["selected"]]
    factors = sorted({float(f) for f in chosen["lr_factor"]})
    if len(factors) != 1:
        raise ConfigError(f"{task} {label}: its selected runs have lr factors {factors}, not one")
    return factors[0], sorted({int(x) for x in chosen["seed"]})


class NotReproduced(RuntimeError):
    """A rerun for ``--restore-predictions`` did not give the scores its earlier row records."""


def restore_pairs(old: pd.DataFrame, done: pd.DataFrame | None = None,
                  only: list[str] | None = None) -> list[dict[str, Any]]:
    """The (task, method) pairs of an earlier study whose per-example predictions are to be made again: its
    selected runs only (each seed at the lr factor chosen then; the sweep's other runs need none), skipping
    pairs ``done`` (the predictions already at the restore's output) holds and, with ``only``, other labels."""
    old = old.assign(selected=old["selected"].astype(str).str.lower().isin(["true", "1"]))
    unknown_label(only, old, "is not a row of the study.csv to restore")
    finished = set() if done is None else set(zip(done["task"], done["method"]))
    pairs = []
    for (task, label), g in old[old["selected"]].groupby(["task", "method"], sort=False):
        if (task, label) in finished or (only is not None and label not in only):
            continue
        factor, seeds = chosen_runs(g, task, label)
        pairs.append({"task": task, "method": label, "seeds": seeds, "lr_factors": [factor]})
    return pairs


def check_reproduced(old: pd.DataFrame, new: pd.DataFrame) -> None:
    """Every rerun's dev and validation scores equal, to the last digit, those of its earlier row (same task,
    method, seed and lr factor): only then are its predictions those of the earlier run."""
    keys = ["task", "method", "seed", "lr_factor"]
    merged = new.merge(old, on=keys, how="left", suffixes=("", "_earlier"), indicator=True)
    for _, r in merged.iterrows():
        if r["_merge"] != "both":
            raise NotReproduced(f"{r['task']} {r['method']} seed {r['seed']}: no earlier row to compare with")
        for column in ("score", "validation_score"):
            if float(r[column]) != float(r[f"{column}_earlier"]):
                raise NotReproduced(
                    f"{r['task']} {r['method']} seed {int(r['seed'])} lr factor {r['lr_factor']:g}: {column} "
                    f"{float(r[column])!r} now, {float(r[f'{column}_earlier'])!r} in the earlier study: this "
                    f"machine or code does not reproduce that run; run the row again instead")


def restore(old_csv: str, root: Path, out_dir: str, command: str, overrides: dict[str, Any] | None = None,
            only: list[str] | None = None, retries: int = 2) -> list[Path]:
    """Per-example predictions for an earlier study whose ``predictions.parquet`` is gone (it stays on the
    machine that ran it): each selected run is run again, one (task, method) pair at a time, and kept only if
    it reproduces its row's scores exactly (:func:`check_reproduced`). ``<out_dir>/study.csv`` gets the
    earlier rows of every restored pair, sweep included and unchanged (their ``git`` is the commit that made
    the numbers), and ``predictions.parquet`` the reruns' predictions; ``out_dir`` may be the study's own
    folder (its study.csv is then left as it is). A pair counts as done once its predictions are there, so a
    killed restore resumes at the next pair. Then the report is drawn (:func:`rebuild`)."""
    import shutil

    old = pd.read_csv(old_csv)
    out = root / out_dir
    out_csv = out / "study.csv"
    in_place = out_csv.resolve() == Path(old_csv).resolve()  # the study's own folder: its rows stay as they are
    pairs = restore_pairs(old, paired.read(out / "predictions.parquet"), only)
    scratch = f"{out_dir}/.restore"
    for pair in pairs:
        print(f"restore: {pair['task']} {pair['method']}: seeds {pair['seeds']} at lr factor {pair['lr_factors'][0]:g}")
        shutil.rmtree(root / scratch, ignore_errors=True)
        study(methods=[], seeds=[], pairs=[pair], overrides=overrides, repo=str(root), out_dir=scratch,
              command=command, retries=retries)
        new = pd.read_csv(root / scratch / "study.csv")
        check_reproduced(old, new)
        out.mkdir(parents=True, exist_ok=True)
        if not in_place:  # the pair's earlier rows, sweep included, beside any rows the output already holds
            rows = old[(old["task"] == pair["task"]) & (old["method"] == pair["method"])]
            with atomic_path(out_csv) as tmp:
                (with_earlier_rows(rows, pd.read_csv(out_csv)) if out_csv.is_file() else rows).to_csv(tmp, index=False)
        preds = paired.read(root / scratch / "predictions.parquet")  # written last: they mark the pair done
        paired.write(out / "predictions.parquet", paired.with_earlier(preds, paired.read(out / "predictions.parquet")))
    shutil.rmtree(root / scratch, ignore_errors=True)
    if not out_csv.is_file():
        raise ConfigError(f"--restore-predictions {old_csv}: no selected rows to restore")
    commit = short_commit(git_commit(root))
    note = (f"The rows restored by `--restore-predictions` (at git {commit}) have per-example predictions from "
            f"reruns of their selected runs, each of which reproduced its row's dev and validation scores exactly.")
    return rebuild([str(out_csv)], root, out_dir, command, overrides=overrides, note=note)


def rebuild(csvs: list[str], root: Path, out_dir: str, command: str, draws: int = paired.DRAWS,
            overrides: dict[str, Any] | None = None, only: list[str] | None = None, note: str = "") -> list[Path]:
    """The report of one or more earlier study.csv files (and the predictions beside each), without running
    anything: e.g. studies run in separate checkouts (one per task) merged into one report, or an older study
    redrawn by newer report code. ``overrides``: the -S settings every row ran with (they are in the header).
    ``only``: the study labels to keep (e.g. the rank sweep out of a larger study); every other row is left out.
    ``note``: a sentence for the header where the rows differ from its shared configuration (e.g. per task)."""
    frames = [pd.read_csv(c) for c in csvs]
    df = pd.concat(frames, ignore_index=True)
    # a run in two files is one run when its rows agree in every column (a study and its extension, or two
    # extensions of one study run side by side, all hold the study's rows): kept once. Rows that differ are
    # two runs under one name (e.g. the same row run again in another checkout): refused, never averaged.
    df = df.drop_duplicates(ignore_index=True)
    twice = df[df.duplicated(paired.KEYS, keep=False)]
    if len(twice):
        r = twice.iloc[0]

        def rows_of(f: pd.DataFrame) -> int:  # the rows of ``f`` that are this run
            return int((f[paired.KEYS] == r[paired.KEYS]).all(axis=1).sum())

        where = [shown_path(c, root) for c, f in zip(csvs, frames) if rows_of(f)]
        raise ConfigError(f"--report: the run {r['task']} {r['method']} seed {int(r['seed'])} lr factor "
                          f"{float(r['lr_factor']):g} has {rows_of(df)} different rows (in {', '.join(where)}); "
                          "give each run once, or drop the rows that ran again")
    if only is not None:
        unknown_label(only, df, "is in none of the study.csv files given to --report")
        df = df[df["method"].isin(only)].reset_index(drop=True)
    df = df.reindex(columns=list(dict.fromkeys([*COLUMNS, *df.columns])))
    df["selected"] = df["selected"].astype(str).str.lower().isin(["true", "1"])
    preds = paired.combine([earlier_predictions(c) for c in csvs]).drop_duplicates(ignore_index=True)
    conflicting = preds[preds.duplicated([*paired.KEYS, "example"])]
    if len(conflicting):
        r = conflicting.iloc[0]
        raise ConfigError(f"--report: the run {r['task']} {r['method']} seed {int(r['seed'])} lr factor "
                          f"{float(r['lr_factor']):g} has different per-example predictions in two of the files given")
    if only is not None and not preds.empty:
        preds = preds[preds["method"].isin(only)].reset_index(drop=True)
    # the header is made again from the configuration every row shares (params.yaml with ``overrides``, the
    # -S settings the studies ran with) and the rows themselves, never copied from an earlier study.md
    commits = list(dict.fromkeys(str(c) for c in df["git"].dropna()))
    factors = sorted({float(f) for f in df["lr_factor"].dropna()})
    factors_per_seed = df.groupby(["task", "method", "seed"])["lr_factor"].nunique()
    swept = factors_per_seed[factors_per_seed > 1].groupby(level=["task", "method"]).size()
    header = study_header(base_params(root, {**(overrides or {}), "registry.enabled": False}, df["task"].iloc[0]),
                          sorted({int(s) for s in df["seed"].dropna()}), factors, commits,
                          int(swept.max()) if len(swept) else 1)
    header += (" The configuration above is params.yaml at the time of drawing with the -S settings given to "
               "`--report`; each row's own is its `params_hash`.")
    if len(csvs) > 1:
        header += (" Merged from " + ", ".join(f"`{shown_path(c, root)}`" for c in csvs) + " (columns `git` and "
                   "`params_hash` of study.csv: the commit and configuration each row ran at).")
    if note:
        header += " " + note.strip()
    return write_report(root / out_dir, df, preds, header, command, draws)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Seeded method study with a per-method lr sweep on validation.")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--lr-factors", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                    help="multiples of each method's recipe lr tried on the first --sweep-seeds seeds")
    ap.add_argument("--sweep-seeds", type=int, default=1,
                    help="how many of the first seeds run every lr factor: the factor with the best mean validation "
                         "score over them is chosen (the study protocol uses 2)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, repeatable")
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--out", default="reports")
    ap.add_argument("--append", metavar="STUDY_CSV",
                    help="keep the rows of an earlier study.csv (except the methods run now) in the report")
    ap.add_argument("--extend-inconclusive", metavar="STUDY_CSV",
                    help=f"run only the new seeds (5 more, up to {paired.MAX_SEEDS}) of the (task, method) pairs "
                         "behind this study's inconclusive verdicts (targets, places against the frontier), at the lr "
                         "factor each pair's sweep chose, keeping every earlier row and prediction; pass the same -S "
                         "settings as the study it extends; with --methods, only those rows (a share for one of "
                         "several checkouts: merge their outputs with --report)")
    ap.add_argument("--report", nargs="+", metavar="STUDY_CSV",
                    help="run nothing: write the report of these study.csv files (merged, with the predictions "
                         "beside each) to --out; with --methods, of those rows only")
    ap.add_argument("--restore-predictions", metavar="STUDY_CSV",
                    help="run an earlier study's selected runs again to make the per-example predictions it lost "
                         "(another machine ran it); each rerun must reproduce its row's scores exactly; the rows "
                         "and predictions go to --out (resumable), then the report is drawn there")
    ap.add_argument("--estimate", action="store_true",
                    help="run nothing: print how many runs the study would make and its estimated CPU time "
                         "(from --append's or --out's study.csv where there is one), then exit")
    ap.add_argument("--note", default="", help="with --report: a sentence added to the report's header, where "
                                              "rows differ from the shared configuration (e.g. per task)")
    args = ap.parse_args(argv)
    root = Path(args.repo).resolve()
    command = shown_command(argv if argv is not None else sys.argv[1:], root)
    if args.report:
        missing = [c for c in args.report if not Path(c).is_file()]
        if missing:
            print(f"error: --report {missing[0]}: no such study.csv", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            overrides = dict(parse_override(s) for s in args.set)
            files = rebuild(args.report, root, args.out, command, overrides=overrides, only=args.methods,
                            note=args.note)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print("\n".join(str(f) for f in files))
        return 0
    if args.restore_predictions:
        if not Path(args.restore_predictions).is_file():
            print(f"error: --restore-predictions {args.restore_predictions}: no such study.csv", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            overrides = dict(parse_override(s) for s in args.set)
            files = restore(args.restore_predictions, root, args.out, command, overrides=overrides,
                            only=args.methods)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except NotReproduced as exc:
            print(f"error: restore: {exc}", file=sys.stderr)
            return 1
        print("\n".join(str(f) for f in files))
        return 0
    pairs = None
    if args.extend_inconclusive:
        if not Path(args.extend_inconclusive).is_file():
            print(f"error: --extend-inconclusive {args.extend_inconclusive}: no such study.csv", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            pairs = extension_pairs(args.extend_inconclusive, only=args.methods)
        except ConfigError as exc:
            print(f"error: --extend-inconclusive: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if not pairs:
            among = f" among --methods {' '.join(args.methods)}" if args.methods else ""
            print(f"study: no inconclusive target left to extend{among} (or every one is at "
                  f"{paired.MAX_SEEDS} seeds)")
            return 0
        args.append = args.extend_inconclusive
    elif not args.methods:
        print("error: --methods is required (or --extend-inconclusive STUDY_CSV)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.sweep_seeds < 1:
        print(f"error: --sweep-seeds must be >= 1, got {args.sweep_seeds}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.append and not Path(args.append).is_file():
        print(f"error: --append {args.append}: no such study.csv", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:  # every row validated before anything runs (the flow plans again from the same arguments)
        overrides = dict(parse_override(s) for s in args.set)
        sp = study_plan(args.methods or [], args.seeds, args.tasks, args.lr_factors, overrides, root, pairs,
                        args.sweep_seeds)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.estimate:
        print(sp.estimate_line(earlier_rows(args.append, root, args.out)))
        return 0
    result = study(methods=args.methods or [], seeds=args.seeds, tasks=args.tasks, lr_factors=args.lr_factors,
                   overrides=overrides, repo=str(root), out_dir=args.out, command=command,
                   append=args.append, pairs=pairs, sweep_seeds=args.sweep_seeds)
    print("\n".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
