"""python -m alexnet_jax.claims: the paper's ablation claims, each measured over seeds.

    python -m alexnet_jax.claims --config=configs/digits.py --workdir=DIR --seeds=5 \
        [--claims=lrn,overlap,towers,lighting,dropout] [--print_commands] [--config.KEY=VALUE]

Each seed trains the config as it is (DIR/base/<seed>) and with each claim's feature taken
away (DIR/<claim>/<seed>), every run through train.train_and_evaluate: it resumes, holds its
workdir, and can be started by hand or on a cluster (--print_commands prints the launch.py
lines instead of running them). A finished run is read, not trained again. The finished runs'
last evaluations make DIR/claims.md and DIR/claims.json: per claim, the top-1 and top-5 error
of both nets (mean and standard deviation over seeds), the difference (ablated minus base,
paired by seed) with its 95% t-interval, the paper's figure, and whether the interval holds it;
DIR/claims.png draws the differences beside the paper's (with matplotlib installed). The paper
gives single runs without intervals; a claim whose runs are missing or unfinished says which.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from alexnet_jax.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Claim:
    what: str  # the feature and the paper's section
    ablation: dict[str, Any]  # config fields that take the feature away
    paper: tuple[float | None, float | None]  # the paper's top-1, top-5 differences (points)
    at_least: bool = False  # the paper says "over": the interval need only reach above it


CLAIMS = {
    "lrn": Claim("LRN (3.3)", {"model.lrn": False}, (1.4, 1.2)),
    "overlap": Claim("overlapping pooling (3.4)", {"model.overlap_pool": False}, (0.4, 0.3)),
    "towers": Claim(
        "two towers against the one-GPU net (3.2)",
        {"model.variant": "one_gpu", "model.towers": 1},
        (1.7, 1.2),
    ),
    "lighting": Claim(
        "PCA lighting (4.1: over 1 point)", {"input.pca_lighting_std": 0.0}, (1.0, None), True
    ),
    "dropout": Claim("dropout (4.2: no figure given)", {"model.dropout_rate": 0.0}, (None, None)),
}
BASE = "base"
METRICS = ("eval/top1_error", "eval/top5_error")


def variant(config: ml_collections.ConfigDict, fields: dict[str, Any], seed: int):
    """`config` with `fields` set and `seed`."""
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict({**fields, "seed": seed})
    return config


def runs(names: list[str], seeds: int) -> list[tuple[str, int, dict[str, Any]]]:
    """(name, seed, fields) of every run the claims need: the base config once per seed."""
    out = [(BASE, s, {}) for s in range(seeds)]
    return out + [(n, s, CLAIMS[n].ablation) for n in names for s in range(seeds)]


def finished(workdir: Path, total: int) -> dict[str, float] | None:
    """The last evaluation of a run that reached step `total`, else None."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    evals = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if "eval/top1_error" in m:
            evals.append(m)
    return evals[-1] if evals and evals[-1]["step"] == total else None


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (a single seed: no interval)."""
    from scipy import stats

    n, mean = len(diffs), float(np.mean(diffs))
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, n - 1) * np.std(diffs, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def _mean_sd(values: list[float]) -> list[float]:
    """Mean and sample standard deviation (0 for one value)."""
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def table(results: dict[tuple[str, int], dict | None], names: list[str], seeds: int) -> dict:
    """The claims' rows from the runs' last evaluations (None: not finished)."""
    rows = {}
    for name in names:
        missing = [
            f"{n}/{s}" for n in (BASE, name) for s in range(seeds) if results[(n, s)] is None
        ]
        row: dict[str, Any] = {"claim": CLAIMS[name].what, "missing": missing}
        if not missing:
            for metric, paper in zip(METRICS, CLAIMS[name].paper, strict=True):
                base = [100 * results[(BASE, s)][metric] for s in range(seeds)]
                ablated = [100 * results[(name, s)][metric] for s in range(seeds)]
                mean, low, high = interval([a - b for a, b in zip(ablated, base, strict=True)])
                if paper is None or math.isnan(low):
                    holds = None
                else:
                    holds = high >= paper if CLAIMS[name].at_least else low <= paper <= high
                row[metric] = {
                    "base": _mean_sd(base),
                    "ablated": _mean_sd(ablated),
                    "difference": [mean, low, high],
                    "paper": paper,
                    "interval_holds_paper": holds,
                }
        rows[name] = row
    return rows


def markdown(rows: dict, seeds: int) -> str:
    lines = [
        f"Errors in %, mean ± sample standard deviation over {seeds} seed(s); difference = "
        "without the feature minus with it, paired by seed (positive: the feature helps), with "
        "its 95% t-interval; holds: the interval contains the paper's difference (for 'over', "
        "reaches it).",
        "",
        "| claim | metric | with | without | difference [95% interval] | paper | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        if row["missing"]:
            lines.append(
                f"| {row['claim']} | | | | runs missing or unfinished: "
                f"{', '.join(row['missing'])} | | |"
            )
            continue
        for metric in METRICS:
            r = row[metric]
            d = r["difference"]
            paper = "" if r["paper"] is None else f"{r['paper']:.1f}"
            holds = {None: "", True: "yes", False: "no"}[r["interval_holds_paper"]]
            lines.append(
                f"| {row['claim']} | {metric.split('/')[1]} | {r['base'][0]:.2f} ± "
                f"{r['base'][1]:.2f} | {r['ablated'][0]:.2f} ± {r['ablated'][1]:.2f} | "
                f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {paper} | {holds} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> bool:
    """The top-1 differences with their intervals beside the paper's, if matplotlib is here."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [n for n, r in rows.items() if not r["missing"]]
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(done) + 1.5))
    for i, name in enumerate(done):
        mean, low, high = rows[name][METRICS[0]]["difference"]
        ax.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt="o", color="C0")
        if rows[name][METRICS[0]]["paper"] is not None:
            ax.plot(rows[name][METRICS[0]]["paper"], i, "x", color="C3")
    ax.set_yticks(range(len(done)), [rows[n]["claim"] for n in done])
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("top-1 error without the feature minus with it (points); x: the paper")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def command(config_path: str, workdir: Path, seed: int, fields: dict, extra: list[str]) -> str:
    """The launch.py line that trains one run."""
    args = [sys.executable, str(REPO / "launch.py"), f"--config={config_path}"]
    args += [f"--workdir={workdir}", f"--config.seed={seed}", *extra]
    args += [f"--config.{k}={v}" for k, v in fields.items()]
    return shlex.join(args)


def run_claims(
    config: ml_collections.ConfigDict, workdir: Path, seeds: int, names: list[str]
) -> dict:
    """Train what is missing, then write DIR/claims.{md,json,png}; returns the rows."""
    from alexnet_jax import train

    unknown = sorted(set(names) - set(CLAIMS))
    if unknown or seeds < 1:
        raise UsageError(
            f"--claims takes {', '.join(CLAIMS)} (got {unknown}) and --seeds at least 1."
        )
    results = {}
    for name, seed, fields in runs(names, seeds):
        run_config = variant(config, fields, seed)
        total = run_config.num_train_steps
        where = workdir / name / str(seed)
        results[(name, seed)] = finished(where, total)
        if results[(name, seed)] is None:
            print(f"claims: training {name}, seed {seed}, in {where}", flush=True)
            train.train_and_evaluate(run_config, str(where))
            results[(name, seed)] = finished(where, total)
        else:
            print(f"claims: {name}, seed {seed}: finished in {where}, read", flush=True)
    rows = table(results, names, seeds)
    (workdir / "claims.json").write_text(json.dumps({"seeds": seeds, "claims": rows}, indent=1))
    (workdir / "claims.md").write_text(markdown(rows, seeds))
    plot(rows, workdir / "claims.png")
    return rows


def main(argv: list[str]) -> None:
    del argv
    config, workdir = _CONFIG.value, Path(_WORKDIR.value).expanduser()
    names = [n for n in _CLAIMS.value if n]
    if config.num_train_steps <= 0:
        sys.exit("claims: error: give the runs a length: --config.num_train_steps=N")
    if _PRINT.value:
        path = str(Path(config_flags.get_config_filename(flags.FLAGS["config"])).resolve())
        extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
        for name, seed, fields in runs(names, _SEEDS.value):
            print(command(path, workdir / name / str(seed), seed, fields, extra))
        return
    from alexnet_jax import backend
    from alexnet_jax.errors import quiet_libraries

    quiet_libraries()
    backend.prepare_backend()  # before JAX starts, as launch.py does
    try:
        run_claims(config, workdir, _SEEDS.value, names)
    except UsageError as e:
        sys.exit(f"claims: error: {e}")
    print((workdir / "claims.md").read_text(), end="")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # configs/ importable from any directory, as for launch.py
    _CONFIG = config_flags.DEFINE_config_file("config", None, "The base config (configs/*.py).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the table go.")
    _SEEDS = flags.DEFINE_integer("seeds", 3, "Runs per net.")
    _CLAIMS = flags.DEFINE_list("claims", list(CLAIMS), f"Which of {', '.join(CLAIMS)}.")
    _PRINT = flags.DEFINE_bool("print_commands", False, "Print the launch.py lines instead.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
