"""Charts: matplotlib set up once (file-only backend), atomic PNG writes, and the evaluate stage's
plots with the data files DVC draws them from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lora_ops.targets import ROLES
from stages.common.io import atomic_path, write_json


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed; imported on first use, it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` atomically and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)


def _loss_window(history: pd.DataFrame) -> int:
    return max(1, len(history) // 30)


def write_loss_data(history: pd.DataFrame, path: Path) -> None:
    """The training-loss plot's data next to its PNG (``training_loss.csv``): a DVC plot, so
    ``dvc plots diff`` overlays two experiments' curves in one chart."""
    data = pd.DataFrame({"step": history["step"], "loss": history["loss"],
                         "loss_smoothed": history["loss"].rolling(_loss_window(history), min_periods=1).mean()})
    with atomic_path(path) as tmp:
        data.to_csv(tmp, index=False)


def _module_cell(name: str) -> tuple[int, str]:
    """(layer, module kind) of a qualified module name, e.g. (3, "attention.output.dense")."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]


def write_structure_data(rows: list[dict], path: Path) -> None:
    """The learned-structure plot's data next to its PNG (``structure.json``, one record per module;
    ``[]`` for a method without learned structure, which DVC shows as no bars for that revision)."""
    records = []
    for r in rows:
        layer, kind = _module_cell(r["module"])
        rec = {"module": f"{layer:02d} {kind}", "name": r["module"], "layer": layer, "kind": kind,
               "rank": float(r["rank"])}
        if r.get("bits_B") is not None:
            rec["bits_B"] = r["bits_B"]
        records.append(rec)
    write_json(path, sorted(records, key=lambda x: (x["layer"], x["kind"])))


def plot_loss(history: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    write_loss_data(history, path.with_suffix(".csv"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.4, label="loss")
    window = _loss_window(history)
    ax.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), lw=1.8,
            label=f"moving mean ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_importance(scores: pd.DataFrame, plan: dict, path: Path) -> None:
    plt = pyplot()
    roles = sorted(scores["role"].unique())
    layers = sorted(scores["layer"].unique())
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.9), 3.8))
    width = 0.8 / max(1, len(roles))
    modes = plan.get("modules", {})
    for i, role in enumerate(roles):
        sub = scores[scores["role"] == role].sort_values("layer")
        bars = ax.bar([lay + i * width for lay in sub["layer"]], sub["importance"], width=width, label=role)
        for bar, module in zip(bars, sub["module"]):
            if modes.get(module, {}).get("mode") == "shared":
                bar.set_hatch("//")
                bar.set_alpha(0.45)
    ax.set_xticks([lay + 0.4 - width / 2 for lay in layers], [str(lay) for lay in layers])
    ax.set_xlabel("layer (hatched: shares the group's LoRA)")
    ax.set_ylabel("share of group output energy")
    ax.legend(ncol=len(roles), fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def plot_placeholder(text: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    save_png(fig, path, dpi=100)


def plot_structure(rows: list[dict], method: str, path: Path) -> None:
    """Learned rank per module as a layer x module-type grid (rank allocators); placeholder otherwise."""
    write_structure_data(rows, path.with_suffix(".json"))
    if not rows:
        plot_placeholder(f"{method}: no learned per-module structure", path)
        return
    plt = pyplot()

    cells = {_module_cell(r["module"]): r for r in rows}
    layers = sorted({k[0] for k in cells})
    kinds = sorted({k[1] for k in cells}, key=lambda k: next((i for i, r in enumerate(ROLES) if r in k), 99))
    grid = [[cells.get((lay, kind), {}).get("rank", float("nan")) for lay in layers] for kind in kinds]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(layers) + 2), 0.45 * len(kinds) + 1.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(lay) for lay in layers])
    ax.set_yticks(range(len(kinds)), kinds)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:
                bits = cells.get((layers[j], kinds[i]), {}).get("bits_B")
                ax.text(j, i, f"{value:g}" + (f"\n{bits}b" if bits else ""), ha="center", va="center",
                        color="w", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{method}: learned rank per module")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    save_png(fig, path)
