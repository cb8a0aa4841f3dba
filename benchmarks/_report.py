"""Shared output of the benchmarks: JSON, CSV and the speedup plot (PNG).

Records are flat dicts (one per measured row). The speedup records every benchmark writes
under the JSON key "speedup" carry ``label``, ``tokens_per_expert`` and ``speedup``
(dense ms / sparse ms), so that plots can be redrawn later, off the GPU machine:

  python benchmarks/_report.py --json=stack_mixtral.json,stack_qwen.json --plot=speedup.png
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterable, Sequence

SPEEDUP_KEY = "speedup"


def write_json(path: str, meta: dict[str, Any], rows: list[dict[str, Any]],
               **sections: Any) -> None:
    """``{**meta, "rows": rows, **sections}`` as indented JSON."""
    _parent(path)
    with open(path, "w") as fh:
        json.dump({**meta, "rows": rows, **sections}, fh, indent=1)


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    # CSV cells are scalars: nested dicts (e.g. per-scope times) become "key.sub" columns.
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": val for sub, val in v.items()})
        elif isinstance(v, (list, tuple)):
            out[k] = json.dumps(v)
        else:
            out[k] = v
    return out


def write_csv(path: str, rows: Iterable[dict[str, Any]],
              meta: dict[str, Any] | None = None) -> None:
    """One line per row; ``meta`` (e.g. preset, device) is repeated as leading columns so
    that CSVs of several runs can be concatenated. Columns: the union of the rows' keys in
    first-seen order; missing cells are empty."""
    flat = [{**(meta or {}), **_flatten(r)} for r in rows]
    columns: list[str] = []
    for r in flat:
        columns.extend(k for k in r if k not in columns)
    # Plain columns first, the flattened "key.sub" ones after them.
    nested = {f"{k}.{sub}" for r in rows for k, v in r.items() if isinstance(v, dict)
              for sub in v}
    columns.sort(key=lambda c: c in nested)
    _parent(path)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(flat)


def _parent(path: str) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


def speedups(rows: Sequence[dict[str, Any]], group_by: Sequence[str], sparse: str,
             baselines: Sequence[str], path_key: str = "path", ms_key: str = "ms"
             ) -> list[dict[str, Any]]:
    """Per group of rows (same values of ``group_by``) and per baseline path present in
    it: ``{**group, baseline, sparse_ms, dense_ms, speedup = dense_ms / sparse_ms}``."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group_by), {})[r[path_key]] = r[ms_key]
    out = []
    for key, ms in groups.items():
        if sparse not in ms:
            continue
        for base in baselines:
            if base in ms:
                out.append(dict(zip(group_by, key), baseline=base, sparse_ms=ms[sparse],
                                dense_ms=ms[base], speedup=ms[base] / ms[sparse]))
    return out


def require_matplotlib() -> None:
    """Raise ImportError with the fix when matplotlib is missing (check before a long run,
    not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib). "
            "Drop --plot and redraw later from the JSON: python benchmarks/_report.py "
            "--json=RESULT.json --plot=OUT.png") from err


def check_plot_flag(plot: str) -> None:
    """For a script's --plot flag: a clear usage error before the run (not after it) when
    plotting is asked for without matplotlib."""
    if plot:
        from absl import app
        try:
            require_matplotlib()
        except ImportError as err:
            raise app.UsageError(str(err)) from None


def plot_speedup(records: Sequence[dict[str, Any]], path: str, title: str = "",
                 x_key: str = "tokens_per_expert", label_key: str = "label") -> None:
    """PNG of speedup vs tokens per expert: one line per label, log2 x axis, and the dense
    baseline drawn as the horizontal line speedup = 1."""
    require_matplotlib()
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        lines.setdefault(str(r[label_key]), []).append((float(r[x_key]), float(r["speedup"])))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="dense = 1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per expert (rows each expert multiplies)")
    ax.set_ylabel("speedup (dense time / sparse time)")
    ys = [p[1] for pts in lines.values() for p in pts] + [1.0]
    ax.set_ylim(0, max(1.2, math.ceil(max(ys) * 11) / 10))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _parent(path)
    fig.savefig(path, format="png")


def main(argv: list[str]) -> None:
    del argv
    records, titles = [], []
    for path in FLAGS.json:
        with open(path) as fh:
            data = json.load(fh)
        records.extend(data.get(SPEEDUP_KEY, []))
        titles.append(str(data.get("preset", os.path.basename(path))))
    if not records:
        raise app.UsageError(f"no '{SPEEDUP_KEY}' records in {FLAGS.json}")
    plot_speedup(records, FLAGS.plot, FLAGS.title or ", ".join(dict.fromkeys(titles)))
    print(f"wrote {FLAGS.plot} ({len(records)} points)")


if __name__ == "__main__":
    # Flags only when run as a script: the benchmarks import this module and define their own.
    from absl import app, flags

    FLAGS = flags.FLAGS
    flags.DEFINE_list("json", None, "benchmark JSON files (bench_kernel/layer/stack)")
    flags.DEFINE_string("plot", "speedup.png", "PNG to write")
    flags.DEFINE_string("title", "", "plot title (default: the presets)")
    flags.mark_flag_as_required("json")
    app.run(main)
