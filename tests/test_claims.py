"""The claims command: runs per claim and seed through the run, read back when finished, and a
table of differences with intervals against the paper's figures."""

import json
import math
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config, tiny_flags

from alexnet_jax import claims


def test_an_interval_of_paired_differences():
    mean, low, high = claims.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low < 1.0 and high > 3.0  # t with 2 degrees of freedom: wide
    assert math.isclose(high - mean, 4.303 * 1.0 / math.sqrt(3), rel_tol=1e-3)
    assert math.isnan(claims.interval([1.0])[1])


def test_a_claim_with_an_unfinished_run_names_it_instead_of_averaging():
    done = {"eval/top1_error": 0.2, "eval/top5_error": 0.05}
    results = {(n, s): done for n in ("base", "lrn") for s in range(2)}
    results[("lrn", 1)] = None
    rows = claims.table(results, ["lrn"], 2)
    assert rows["lrn"]["missing"] == ["lrn/1"] and "eval/top1_error" not in rows["lrn"]
    assert "runs missing or unfinished: lrn/1" in claims.markdown(rows, 2)


@pytest.mark.slow  # six short runs, then the same command again
def test_the_claims_table_from_runs_over_seeds_read_back_when_finished(tmp_path, capsys):
    config = tiny_config(num_train_steps=8, checkpoint_every_steps=8, eval_every_steps=8)
    rows = claims.run_claims(config, tmp_path, 2, ["lrn", "overlap"])
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["base", "lrn", "overlap"]
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert saved["seeds"] == 2 and set(saved["claims"]) == {"lrn", "overlap"}
    for name in ("lrn", "overlap"):
        top1 = rows[name]["eval/top1_error"]
        low, high = top1["difference"][1:]
        assert low <= top1["difference"][0] <= high and top1["paper"] is not None
    table = (tmp_path / "claims.md").read_text()
    assert table.count("| LRN (3.3) |") == 2 and table.count("| overlapping pooling") == 2
    assert (tmp_path / "claims.png").stat().st_size > 0

    # Again: every run is read, none trained; a planted error changes the table.
    checkpoints = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("checkpoints/*")}
    metrics = tmp_path / "lrn" / "0" / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    lines[-1]["eval/top1_error"] = 0.999
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    again = claims.run_claims(config, tmp_path, 2, ["lrn", "overlap"])
    assert "training" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("checkpoints/*")} == checkpoints
    assert again["overlap"] == rows["overlap"]
    assert again["lrn"]["eval/top1_error"] != rows["lrn"]["eval/top1_error"]
    assert (tmp_path / "claims.md").read_text() != table


@pytest.mark.slow  # one run, started from a printed line
def test_print_commands_prints_launch_lines_that_run(tmp_path):
    flags = tiny_flags(num_train_steps=4, checkpoint_every_steps=4, eval_every_steps=4)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.claims",
            f"--config={REPO / 'configs/digits.py'}",
            f"--workdir={tmp_path}",
            "--seeds=2",
            "--claims=towers",
            "--print_commands",
            *flags,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip  (from another directory: the configs are found all the same)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4  # base and towers, two seeds each
    towers = [x for x in lines if "/towers/1" in x]
    assert len(towers) == 1 and "--config.model.variant=one_gpu" in towers[0]
    assert "--config.seed=1" in towers[0] and "--config.num_train_steps=4" in towers[0]
    assert not (tmp_path / "towers").exists()  # printed, not run
    r = subprocess.run(shlex.split(towers[0]), cwd=REPO, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert claims.finished(tmp_path / "towers" / "1", 4) is not None
