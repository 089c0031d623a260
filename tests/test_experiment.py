"""The benchmark runner: paired intervals, resumable runs, tables regenerated from record files.

Oracles: scipy.stats' paired t-test interval (an independent implementation); a rerun of the same
command finds every run finished and trains nothing (observed by counting fit() calls and by the
record files being untouched); a changed budget is a different run.
"""
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from align_kd import experiment, zoo
from align_kd.experiment import SETTINGS, paired_interval, quick, report, run_setting, run_states, summarise
from shared_archive import ARCHIVE


def test_versions_state_the_machine_and_the_commit():
    """Records and cards say what made them: torch's own answers and git's, read independently."""
    v = experiment.versions()
    assert v["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and v["cpu"]
    assert (v["torch"], v["threads"]) == (torch.__version__, torch.get_num_threads())
    repo = Path(experiment.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert v["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert json.loads(json.dumps(v)) == v  # JSON as it is


@pytest.mark.parametrize("a,b", [([0.81, 0.83, 0.80], [0.79, 0.80, 0.80]),
                                 ([0.5, 0.52, 0.49, 0.55, 0.51], [0.51, 0.5, 0.5, 0.5, 0.52])])
def test_paired_interval_matches_scipy(a, b):
    got = paired_interval(a, b)
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got["n"] == len(a)
    assert got["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / len(a), abs=1e-15)
    assert got["lo"] == pytest.approx(ref.low, abs=1e-12) and got["hi"] == pytest.approx(ref.high, abs=1e-12)


def test_paired_interval_edge_cases():
    assert paired_interval([0.7], [0.6])["lo"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired_interval([0.1, 0.2], [0.1])


def _record(strategy, seed, acc):
    return {"strategy": strategy, "seed": seed, "test_acc": acc, "best_acc": acc, "teacher_acc": 0.9, "wall_s": 1.0}


def test_table_states_the_training_accuracy_beside_the_test_accuracy():
    records = [_record("alone", 0, 0.70), {**_record("alone", 1, 0.72), "train_acc": 0.80},
               {**_record("hinton", 0, 0.71), "train_acc": 0.74}, {**_record("hinton", 1, 0.73), "train_acc": 0.76}]
    rows = {r["strategy"]: r for r in summarise(records)}
    assert rows["alone"]["train_acc"] == pytest.approx(0.80)  # the mean over the records that have it
    assert rows["hinton"]["train_acc"] == pytest.approx(0.75)
    text = experiment.format_table(summarise(records), 0.9)
    assert "| train acc* |" in text and "| 0.7500 |" in text and "| 0.8000 |" in text


def test_summary_pairs_by_seed_and_picks_the_best_fixed_plan():
    records = [_record("hinton", s, a) for s, a in enumerate([0.70, 0.72, 0.71])]
    records += [_record("pairwise", s, a) for s, a in enumerate([0.69, 0.70, 0.72])]
    records += [_record("uniform", s, a) for s, a in enumerate([0.71, 0.73, 0.72])]
    records += [_record("sinkhorn", s, a) for s, a in [(2, 0.75), (0, 0.74)]]  # seed 1 not finished yet
    rows = {r["strategy"]: r for r in summarise(records)}
    assert rows["sinkhorn"]["best_fixed"] == "uniform"
    assert rows["sinkhorn"]["vs_hinton"]["n"] == 2
    assert rows["sinkhorn"]["vs_hinton"]["mean"] == pytest.approx(((0.74 - 0.70) + (0.75 - 0.71)) / 2)
    assert rows["sinkhorn"]["vs_best_fixed"]["mean"] == pytest.approx(((0.74 - 0.71) + (0.75 - 0.72)) / 2)
    assert rows["hinton"]["vs_hinton"] is None and rows["uniform"]["vs_best_fixed"] is None


def test_best_fixed_plan_is_chosen_among_the_rows_with_the_most_seeds():
    records = [_record("pairwise", s, a) for s, a in enumerate([0.69, 0.70, 0.72])]
    records += [_record("uniform", 0, 0.80)]  # higher mean, but on one seed only
    records += [_record("sinkhorn", s, 0.75) for s in range(3)]
    rows = {r["strategy"]: r for r in summarise(records)}
    assert rows["sinkhorn"]["best_fixed"] == "pairwise"
    assert rows["sinkhorn"]["vs_best_fixed"]["n"] == 3
    # once uniform has as many seeds, its higher mean decides again
    records += [_record("uniform", s, 0.80) for s in (1, 2)]
    assert {r["strategy"]: r for r in summarise(records)}["sinkhorn"]["best_fixed"] == "uniform"


def test_heldout_rows_are_paired_with_their_control():
    control = experiment.HELDOUT_CONTROL
    assert experiment.PLAN_VARIANTS[control][1]["plan_objective"] == "heldout"  # the rule's split, never updated
    records = [_record(control, s, a) for s, a in enumerate([0.770, 0.772, 0.768])]
    records += [_record("sinkhorn-heldout", s, a) for s, a in enumerate([0.760, 0.759, 0.755])]
    records += [_record("sinkhorn-heldout-retrain", 0, 0.767)]
    records += [_record("pairwise", s, a) for s, a in enumerate([0.773, 0.778, 0.771])]
    records += [_record("hinton", s, 0.764) for s in range(3)] + [_record("sinkhorn", s, 0.776) for s in range(3)]
    rows = {r["strategy"]: r for r in summarise(records)}
    got = rows["sinkhorn-heldout"]["vs_control"]
    assert got["n"] == 3 and got["mean"] == pytest.approx((-0.010 - 0.013 - 0.013) / 3)
    assert rows["sinkhorn-heldout-retrain"]["vs_control"] == {"mean": pytest.approx(-0.003), "lo": None, "hi": None, "n": 1}
    assert rows["pairwise"]["vs_control"]["mean"] == pytest.approx((0.003 + 0.006 + 0.003) / 3)
    # rows that do not learn from held-out loss, and the control itself, are not paired with it
    assert rows["hinton"]["vs_control"] is None and rows["sinkhorn"]["vs_control"] is None
    assert rows[control]["vs_control"] is None
    text = experiment.format_table(list(rows.values()), 0.9)
    assert f"control `{control}`" in text and "| sinkhorn-heldout | 3 | -1.20 [" in text and "| pairwise | 3 | +0.40 [" in text
    # without the control's records there is no such table
    plain = experiment.format_table(summarise([r for r in records if r["strategy"] != control]), 0.9)
    assert "control" not in plain


def test_overview_puts_the_settings_side_by_side(tmp_path):
    """Planted records in two settings: each cell is the row's mean and its paired difference to hinton
    (computed here by hand), starred only where the interval excludes 0; the bold cell is the best row
    among those with the most seeds, never a one-seed row with a higher mean."""
    a = [_record("hinton", s, x) for s, x in enumerate([0.70, 0.72, 0.71])]
    a += [_record("pairwise", s, x) for s, x in enumerate([0.73, 0.75, 0.74])]  # +3.00 on every seed
    a += [_record("sinkhorn", s, x) for s, x in enumerate([0.72, 0.71, 0.73])]  # +1, -1, +2: straddles 0
    a += [_record("softmax", 0, 0.90)]  # higher, but one seed
    b = [_record("hinton", s, 0.60) for s in range(3)] + [_record("alone", s, x) for s, x in enumerate([0.58, 0.585, 0.575])]
    view = experiment.overview({"set-a": summarise(a), "set-b": summarise(b)})
    assert view["settings"] == ["set-a", "set-b"]
    assert list(view["rows"]) == ["alone", "hinton", "pairwise", "softmax", "sinkhorn"]  # the benchmark's row order
    cell = view["rows"]["sinkhorn"]["set-a"]
    assert cell["test_acc"] == pytest.approx(0.72) and cell["runs"] == 3
    assert cell["vs_hinton"]["mean"] == pytest.approx((0.02 - 0.01 + 0.02) / 3)
    assert view["rows"]["pairwise"]["set-a"]["best"] and not view["rows"]["softmax"]["set-a"]["best"]
    assert view["rows"]["hinton"]["set-b"]["best"] and "set-b" not in view["rows"]["pairwise"]
    text = experiment.format_overview(view)
    assert "| row | set-a | set-b |" in text
    assert "| pairwise | **0.7400** +3.00* |  |" in text  # identical differences: a zero-width interval, excluding 0
    assert "| sinkhorn | 0.7200 +1.00 |  |" in text  # no star: the interval straddles 0
    assert "| softmax | 0.9000 +20.00 (1) |  |" in text  # one seed: no interval, its count shown, not bold
    assert "| alone |  | 0.5800 -2.00* |" in text and "| hinton | 0.7100 | **0.6000** |" in text
    picture = experiment.plot_overview(view, tmp_path / "overview.png")
    import matplotlib.image
    assert matplotlib.image.imread(picture).shape[2] in (3, 4)


def test_report_of_two_settings_opens_with_the_overview_of_their_committed_records(tmp_path):
    """The committed records of two settings (copied, so the repository's results are not rewritten):
    the report's first table gives each row the mean of its records' accuracies and the paired
    difference to hinton, both read here straight from the record files, and draws overview.png."""
    results = Path(experiment.__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = [(name, f"{row}-s{seed}") for name in ("real-vit", "real-resnet-vit") for row in ("hinton", "pairwise")
            for seed in (0, 1)]
    for name, run in runs:
        (tmp_path / name / run).mkdir(parents=True)
        for file in ("record.json", "result.json"):
            shutil.copy(results / name / run / file, tmp_path / name / run / file)
    acc = {(name, run): json.loads((tmp_path / name / run / "record.json").read_text())["test_acc"] for name, run in runs}
    text = report([SETTINGS["real-vit"], SETTINGS["real-resnet-vit"]], tmp_path)
    assert text.startswith("### At a glance") and text.index("### At a glance") < text.index("### real-vit:")
    cells = []
    for name in ("real-vit", "real-resnet-vit"):
        mean = (acc[name, "pairwise-s0"] + acc[name, "pairwise-s1"]) / 2
        diff = 100 * ((acc[name, "pairwise-s0"] - acc[name, "hinton-s0"]) + (acc[name, "pairwise-s1"] - acc[name, "hinton-s1"])) / 2
        cells.append(f"**{mean:.4f}** {diff:+.2f}")
    assert any(line.startswith("| pairwise | " + cells[0]) and cells[1] in line for line in text.splitlines())
    view = json.loads((tmp_path / "overview.json").read_text())
    assert view["settings"] == ["real-vit", "real-resnet-vit"] and (tmp_path / "overview.png").stat().st_size > 0
    assert report([SETTINGS["real-vit"]], tmp_path).startswith("### real-vit:")  # one setting: its table alone


def test_rerun_skips_finished_runs_and_tables_come_from_the_records(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_KD_CACHE", str(tmp_path / "cache"))  # this test's own data and teacher cache
    setting = replace(quick(SETTINGS["real-cnn"]), train_limit=256, test_limit=128)
    calls = []
    real_fit = experiment.fit

    def counting_fit(*args, **kwargs):
        calls.append(kwargs.get("kd_loss", "hinton"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(experiment, "fit", counting_fit)
    out = tmp_path / "results"
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    first, _ = run_setting(setting, ["alone", "dkd"], [0], out, data_root=data, progress=False)
    assert calls == ["hinton", "dkd"]
    files = sorted(out.glob("real-cnn/*/record.json"))
    assert [f.parent.name for f in files] == ["alone-s0", "dkd-s0"]
    stamps = [f.stat().st_mtime_ns for f in files]
    rec = json.loads(files[1].read_text())
    for key in ("protocol", "dataset", "setting", "strategy", "seed", "test_acc", "teacher_acc", "test_images", "versions",
                "plan_objective", "dustbin", "mi_estimator"):
        assert key in rec
    assert rec["protocol"] == "real" and rec["test_images"] == 128 and rec["fit_options"]["kd_loss"] == "dkd"
    assert (rec["plan_objective"], rec["dustbin"], rec["mi_estimator"]) == ("mi", False, "vid")
    history = json.loads((files[1].parent / "result.json").read_text())["history"]
    assert rec["train_acc"] == history[-1]["train_acc"] and 0 < rec["train_acc"] < 1

    again, _ = run_setting(setting, ["alone", "dkd", "ls"], [0], out, data_root=data, progress=False)
    assert calls == ["hinton", "dkd", "ls"]  # only the new row trained
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert [r["test_acc"] for r in again[:2]] == [r["test_acc"] for r in first]
    # a record written before these fields existed gets them back from its fit options when it is read
    old = {k: v for k, v in rec.items() if k not in experiment.RECORD_OPTIONS + ("train_acc",)}
    old["fit_options"] = {**old["fit_options"], "mi_estimator": "infonce"}
    files[1].write_text(json.dumps(old))
    back = experiment.finished_record(files[1].parent, rec["run_key"])
    assert (back["plan_objective"], back["dustbin"], back["mi_estimator"]) == ("mi", False, "infonce")
    assert back["train_acc"] == rec["train_acc"]  # from the run's result.json
    files[1].write_text(json.dumps(rec))

    # a record whose options are no longer the row's (the row's definition changed) is run again
    stale = json.loads(files[1].read_text())
    stale["fit_options"]["kd_temperature"] = 9.0
    files[1].write_text(json.dumps(stale))
    assert "| dkd |" not in report([setting], out) and "| alone |" in report([setting], out)  # nor do the tables read it
    run_setting(setting, ["dkd"], [0], out, data_root=data, progress=False)
    assert calls == ["hinton", "dkd", "ls", "dkd"]
    assert json.loads(files[1].read_text())["fit_options"]["kd_temperature"] == rec["fit_options"]["kd_temperature"]

    # a record distilled from another teacher (retrained in place under the same name) is run again:
    # by its teacher key, or by its teacher accuracy where a record predates the key
    for field, value in (("teacher_key", "another-teacher"), ("teacher_acc", rec["teacher_acc"] + 0.01)):
        other = json.loads(files[1].read_text())
        assert other["teacher_key"] == rec["teacher_key"] and rec["teacher_key"]
        if field == "teacher_acc":
            del other["teacher_key"]
        other[field] = value
        files[1].write_text(json.dumps(other))
        run_setting(setting, ["dkd"], [0], out, data_root=data, progress=False)
        assert calls[-1] == "dkd" and len(calls) == (5 if field == "teacher_key" else 6)
    kept = json.loads(files[1].read_text())
    assert (kept["teacher_key"], kept["teacher_acc"]) == (rec["teacher_key"], rec["teacher_acc"])
    run_setting(setting, ["dkd"], [0], out, data_root=data, progress=False)  # and that record is reused again
    assert len(calls) == 6
    keyless = {k: v for k, v in kept.items() if k != "teacher_key"}  # as committed records are: same teacher by accuracy
    files[1].write_text(json.dumps(keyless))
    run_setting(setting, ["dkd"], [0], out, data_root=data, progress=False)
    assert len(calls) == 6
    files[1].write_text(json.dumps(kept))

    longer = replace(setting, epochs=2)  # another budget is another run
    run_setting(longer, ["alone"], [0], out, data_root=data, progress=False)
    assert calls[-1] == "hinton" and len(calls) == 7

    readme = tmp_path / "README.md"
    readme.write_text("# intro\n\nkept\n")
    text = report([setting], out, readme=readme)
    body = readme.read_text()
    assert body.startswith("# intro\n\nkept\n") and experiment.README_START in body and "| dkd |" in body
    assert "| alone |" not in text  # alone-s0 now holds the longer budget's record: not this setting's run
    report([setting], out, readme=readme)  # regenerating replaces the block, never appends a second one
    assert readme.read_text().count(experiment.README_START) == 1
    (out / "real-cnn-noaug").mkdir()  # a diagnostic setting with a results folder
    report([setting], out, readme=readme)  # a report of one setting keeps every other setting's section
    body = readme.read_text()
    assert all(f"### {name}:" in body for name in (*experiment.REAL_TABLE, "real-cnn-noaug"))
    assert body.count("### real-cnn:") == 1 and "real-cnn-beta" not in body  # no folder, no section


def test_softmax_retrain_is_the_mi_rules_plan_fixed_and_not_paired_with_the_heldout_control():
    """`softmax-retrain` holds `softmax`'s final plan from step 0 (the control for learning the plan
    against the plan it finds): a fixed plan, options otherwise those of `softmax`, described as such,
    and, unlike the held-out retrain row, not read against the held-out split's control."""
    setting = SETTINGS["real-vit"]
    assert experiment.PLAN_FROM_ROW["softmax-retrain"] == "softmax"
    name, opts = experiment._fit_options(setting, "softmax-retrain", 0, False)
    assert name == "fixed" and opts == experiment._fit_options(setting, "softmax", 0, False)[1]
    assert experiment._against_control("sinkhorn-heldout-retrain") and not experiment._against_control("softmax-retrain")
    text = experiment.row_settings(setting)
    line = next(x for x in text.splitlines() if x.startswith("- `softmax-retrain`"))
    assert "final plan `softmax` learned on the same seed, held fixed from step 0" in line and "search, then" not in line
    assert experiment.run_key(setting, "softmax-retrain", 0) != experiment.run_key(setting, "softmax", 0)


def test_search_then_retrain_uses_the_plan_the_heldout_row_learned(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_KD_CACHE", str(tmp_path / "cache"))
    base = quick(SETTINGS["real-cnn"])  # 230 training images after the split: 4 steps, an update every 2nd
    setting = replace(base, train_limit=256, test_limit=128, fit_options={**base.fit_options, "heldout_every": 2})
    out = tmp_path / "results"
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    with pytest.raises(ValueError, match="retrains with the plan that row 'sinkhorn-heldout' learned on seed 0"):
        run_setting(setting, ["sinkhorn-heldout-retrain"], [0], out, data_root=data, progress=False)
    (search, retrain), _ = run_setting(setting, ["sinkhorn-heldout", "sinkhorn-heldout-retrain"], [0], out,
                                       data_root=data, progress=False)
    assert retrain["fit_strategy"] == "fixed" and retrain["plan"] == search["plan"]  # the learned plan, held fixed
    assert search["plan_objective"] == "heldout" and retrain["plan_objective"] == "mi"  # rows told apart by their record
    # a row whose name continues with "-s" is not a seed of this row (it was read as seed 0 twice)
    shutil.copytree(out / "real-cnn" / "sinkhorn-heldout-s0", out / "real-cnn" / "sinkhorn-heldout-slow-s0")
    assert [r["strategy"] for r in experiment.collect_records(out, setting)].count("sinkhorn-heldout") == 1
    shutil.rmtree(out / "real-cnn" / "sinkhorn-heldout-slow-s0")
    report([setting], out)  # the learned row's plan evolution is drawn; the retrain row's plan never moves
    assert [f.name for f in (out / "real-cnn" / "plans").iterdir()] == ["sinkhorn-heldout.png"]
    assert search["train_images"] == retrain["train_images"] == 256  # the loader; the search held 26 of them out
    held = json.loads((out / "real-cnn" / "sinkhorn-heldout-s0" / "result.json").read_text())
    assert any(r.get("kind") == "heldout" for r in held["solves"]) and retrain["fit_options"].get("plan_objective") is None
    # the source row has another plan now (run again): the retrain record is out of date, left out of
    # the tables, and trained again with the new plan
    file = out / "real-cnn" / "sinkhorn-heldout-s0" / "record.json"
    changed = json.loads(file.read_text())
    changed["plan"] = [row[::-1] for row in changed["plan"]]  # columns reversed: still a plan
    assert changed["plan"] != search["plan"]
    file.write_text(json.dumps(changed))
    assert "| sinkhorn-heldout-retrain |" not in report([setting], out)
    (again,), _ = run_setting(setting, ["sinkhorn-heldout-retrain"], [0], out, data_root=data, progress=False)
    assert again["plan"] == changed["plan"] and "| sinkhorn-heldout-retrain |" in report([setting], out)
    # the mean-signal retrain row: the plan the search run's hypergradients pick on average, from its result.json
    (mean_row,), _ = run_setting(setting, ["sinkhorn-heldout-mean-retrain"], [0], out, data_root=data, progress=False)
    signal = [u["hypergrad"] for u in held["solves"] if u.get("kind") == "heldout"]
    expected = np.asarray(signal).mean(0).argmin(0)  # (S,): per student layer, the teacher layer of lowest mean
    assert mean_row["fit_strategy"] == "fixed" and np.array_equal(np.asarray(mean_row["plan"]).argmax(0), expected)
    assert np.asarray(mean_row["plan"]).sum(0).tolist() == [1.0] * len(expected)  # one-hot columns
    # a source result.json with another signal makes the record out of date, as a changed source plan does
    t = np.asarray(signal).shape[1]
    other = -np.eye(t)[:, (expected + 1) % t]  # (T, S): lowest one row below the picked one in every column
    planted = {**held, "solves": [{**u, "hypergrad": other.tolist()} if u.get("kind") == "heldout" else u
                                  for u in held["solves"]]}
    assert "| sinkhorn-heldout-mean-retrain |" in report([setting], out)
    (out / "real-cnn" / "sinkhorn-heldout-s0" / "result.json").write_text(json.dumps(planted))
    assert "| sinkhorn-heldout-mean-retrain |" not in report([setting], out)
    # the signal-retrain row: the search run's own plan update replayed on the mean hypergradient of each quarter
    (signal_row,), _ = run_setting(setting, ["sinkhorn-heldout-signal-retrain"], [0], out, data_root=data, progress=False)
    replayed = experiment.plan_from_signal_replay(planted)
    assert signal_row["fit_strategy"] == "fixed" and signal_row["plan"] == replayed.tolist()
    assert not torch.allclose(replayed, torch.tensor(held["plan"]), atol=0.05)  # not the search run's final plan
    assert "| sinkhorn-heldout-signal-retrain |" in report([setting], out)


def test_plan_from_mean_hypergradient_follows_the_whole_run_not_its_last_update():
    """Planted answer: three updates whose last one points elsewhere; per column the row of lowest mean wins
    (ties to the shallower row), the plan is one-hot per column, and bad input says what was expected."""
    h = np.zeros((3, 3, 2))
    h[:, 0, 0] = [3.0, 3.0, -5.0]  # mean +1/3: the last update's lowest in column 0
    h[:, 2, 0] = [-0.5, -0.5, 0.0]  # mean -1/3: the column's lowest mean
    h[:, 1, 1] = [-1.0, -1.0, -1.0]  # column 1: row 1
    plan = experiment.plan_from_mean_hypergradient(h)
    assert plan.tolist() == [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert h[-1].argmin(0).tolist() != plan.argmax(0).tolist()  # the last update alone would pick another plan
    assert experiment.plan_from_mean_hypergradient(np.zeros((2, 3, 2))).argmax(0).tolist() == [0, 0]  # ties: shallower
    for bad in (np.zeros((0, 3, 2)), np.zeros((3, 2)), np.full((1, 2, 2), np.nan)):
        with pytest.raises(ValueError, match="Expected a non-empty \\(updates, T, S\\) array of finite hypergradients"):
            experiment.plan_from_mean_hypergradient(bad)


def test_mi_depth_order_on_a_gaussian_markov_chain_and_closed_forms():
    """Oracle 1: a planted Markov chain x -> t_1 -> t_2 -> t_3 (t_{k+1} = t_k + noise) and student layers
    s_j = x + noise, all jointly Gaussian, whose MI has the closed form I = -log(1 - rho^2) / 2: the
    data-processing inequality holds, so every adjacent pair is ordered, every column falls strictly with
    depth and peaks at the first tap. Oracle 2: Spearman's closed form 1 - 6 sum d^2 / (n (n^2 - 1)) on a
    hand-ranked column, the reversed chain, constant columns, and bad input."""
    tap_noise = np.cumsum([0.2, 0.5, 1.0])  # (T,) variance of t_k - x along the chain
    student_noise = np.array([0.1, 0.7, 2.0, 5.0])  # (S,)
    rho2 = 1.0 / np.outer(1.0 + tap_noise, 1.0 + student_noise)  # (T, S) squared correlation of t_k and s_j
    mi = -0.5 * np.log1p(-rho2)
    assert experiment.mi_depth_order(mi) == {"ordered": 1.0, "rho": -1.0, "argmax_depth": 0.0, "head_argmax_depth": 0.0}
    assert experiment.mi_depth_order(mi[::-1].copy()) == {"ordered": 0.0, "rho": 1.0, "argmax_depth": 1.0,
                                                          "head_argmax_depth": 1.0}

    column = np.array([[3.0], [1.0], [2.0]])  # ranks 3, 1, 2 against depth ranks 1, 2, 3: d = 2, -1, -1
    got = experiment.mi_depth_order(column)
    assert got["rho"] == pytest.approx(1 - 6 * 6 / (3 * 8))  # -0.5
    assert got["ordered"] == 0.5 and got["argmax_depth"] == 0.0  # 3 >= 1 holds, 1 >= 2 does not
    flat = experiment.mi_depth_order(np.array([[1.0, 2.0], [1.0, 1.0], [1.0, 0.0]]))  # column 0 constant: no rank
    assert flat["rho"] == pytest.approx(-1.0) and flat["ordered"] == 1.0 and flat["head_argmax_depth"] == 0.0
    for bad in (np.zeros((1, 3)), np.zeros(4), np.array([[1.0], [np.inf]])):
        with pytest.raises(ValueError, match="Expected a finite \\(T, S\\) matrix of MI estimates"):
            experiment.mi_depth_order(bad)


def test_a_run_cut_off_mid_way_continues_from_its_last_epoch(tmp_path, monkeypatch):
    """Oracle: the same run uninterrupted. A run stopped in its second epoch leaves no record but its
    first epoch's checkpoint; the same command continues from there and records the identical run
    (accuracy, curve, plan), then clears the checkpoints. A cut-off run of other options is not continued."""
    monkeypatch.setenv("ALIGN_KD_CACHE", str(tmp_path / "cache"))
    setting = replace(quick(SETTINGS["real-cnn"]), train_limit=256, test_limit=128, epochs=2)
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    real_build = experiment.build_model
    forwards, bomb_at = [0], [None]

    def student_with_a_fuse(*args, **kwargs):  # the real student; its forward raises Ctrl-C at call bomb_at
        model = real_build(*args, **kwargs)

        def count(module, inputs, output):
            forwards[0] += 1
            if forwards[0] == bomb_at[0]:
                raise KeyboardInterrupt
        model.register_forward_hook(count)
        return model

    monkeypatch.setattr(experiment, "build_model", student_with_a_fuse)
    (whole,), _ = run_setting(setting, ["sinkhorn"], [0], tmp_path / "whole", data_root=data, progress=False)
    per_run = forwards[0]
    assert whole["resumed_after_epoch"] == 0 and not (tmp_path / "whole" / "real-cnn" / "sinkhorn-s0" / "checkpoint").exists()

    run_dir = tmp_path / "cut" / "real-cnn" / "sinkhorn-s0"
    forwards[0], bomb_at[0] = 0, per_run - 1  # the second epoch's last forward: after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_setting(setting, ["sinkhorn"], [0], tmp_path / "cut", data_root=data, progress=False)
    assert not (run_dir / "record.json").exists()
    assert [p.name for p in sorted((run_dir / "checkpoint").glob("*.pt"))] == ["checkpoint-epoch0001.pt"]
    bomb_at[0] = None
    (resumed,), _ = run_setting(setting, ["sinkhorn"], [0], tmp_path / "cut", data_root=data, progress=False)
    assert resumed["resumed_after_epoch"] == 1
    for key in ("test_acc", "best_acc", "train_acc", "curve", "plan", "run_key"):
        assert resumed[key] == whole[key], key
    assert not (run_dir / "checkpoint").exists() and resumed["wall_s"] > 0

    # the row's options changed after the cut: the old checkpoints are discarded, the run starts over
    forwards[0], bomb_at[0] = 0, per_run - 1
    with pytest.raises(KeyboardInterrupt):
        run_setting(setting, ["sinkhorn"], [1], tmp_path / "cut", data_root=data, progress=False)
    states = run_states(tmp_path / "cut", setting, ["sinkhorn"], [0, 1, 2])  # what `bench --status` shows
    assert [(s["state"], s.get("epoch"), s.get("test_acc")) for s in states] == [
        ("finished", None, whole["test_acc"]), ("cut", 1, None), ("to run", None, None)]
    text = experiment.format_status(setting, states)
    assert f"| sinkhorn | {whole['test_acc']:.4f} | cut after 1/2 | to run |" in text
    assert f"2 runs left, about {1.5 * resumed['wall_s'] / 3600:.1f} h" in text  # half a run plus a whole one
    stamp = run_dir.with_name("sinkhorn-s1") / "checkpoint" / "run.json"
    edited = json.loads(stamp.read_text())
    edited["fit_options"]["lr"] = 0.5
    stamp.write_text(json.dumps(edited))
    assert run_states(tmp_path / "cut", setting, ["sinkhorn"], [1])[0]["state"] == "to run"  # it will not be continued
    bomb_at[0] = None
    with pytest.warns(RuntimeWarning, match="Starting new logs"):  # the cut-off run's logs are replaced, not continued
        (fresh,), _ = run_setting(setting, ["sinkhorn"], [1], tmp_path / "cut", data_root=data, progress=False)
    assert fresh["resumed_after_epoch"] == 0 and len(fresh["curve"]) == 2


def test_a_row_that_diverges_is_recorded_and_the_benchmark_goes_on(tmp_path, monkeypatch):
    """A real blow-up (lr 1e30: the first step sends the weights to ~1e30, every later loss is not
    finite): fit() gives up after max_bad_steps, the run leaves diverged.json instead of a record, the
    next row still runs, a rerun skips the run without building a student, the report and
    `bench --status` say so, and once the options change the run trains again and the stale
    divergence goes."""
    monkeypatch.setenv("ALIGN_KD_CACHE", str(tmp_path / "cache"))
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    base = replace(quick(SETTINGS["real-cnn"]), train_limit=256, test_limit=128, epochs=1)
    setting = replace(base, fit_options={**base.fit_options, "lr": 1e30, "max_bad_steps": 3})
    records, _ = run_setting(setting, ["alone", "hinton"], [0], tmp_path, data_root=data, progress=False)
    assert records == []
    for row in ("alone", "hinton"):  # the first row's blow-up did not stop the second
        run_dir = tmp_path / "real-cnn" / f"{row}-s0"
        gave_up = json.loads((run_dir / experiment.DIVERGED_FILE).read_text())
        assert (gave_up["strategy"], gave_up["seed"], gave_up["diverged"]) == (row, 0, True)
        assert (gave_up["first_step"], gave_up["step"]) == (1, 3)  # step 0 is finite; steps 1-3 are skipped
        assert "the loss is" in gave_up["reason"] and gave_up["fit_options"]["lr"] == 1e30
        assert not (run_dir / "record.json").exists() and not (run_dir / "checkpoint").exists()

    built = [0]
    real_build = experiment.build_model

    def counting_build(*args, **kwargs):
        built[0] += 1
        return real_build(*args, **kwargs)

    monkeypatch.setattr(experiment, "build_model", counting_build)
    assert run_setting(setting, ["alone", "hinton"], [0], tmp_path, data_root=data, progress=False)[0] == []
    assert built[0] == 0  # neither run was trained again
    text = report([setting], tmp_path)
    assert "no finished runs yet" in text
    assert "`alone` seed 0 diverged: fit() gave up at step 3" in text and "`hinton` seed 0 diverged" in text
    states = run_states(tmp_path, setting, ["alone"], [0, 1])
    assert [(s["state"], s.get("step")) for s in states] == [("diverged", 3), ("to run", None)]
    assert "| alone | diverged (step 3) | to run |" in experiment.format_status(setting, states)

    calm = replace(setting, fit_options=base.fit_options)  # the row's options change: the run is due again
    assert run_states(tmp_path, calm, ["alone"], [0])[0]["state"] == "to run"
    (record,), _ = run_setting(calm, ["alone"], [0], tmp_path, data_root=data, progress=False)
    assert built[0] == 1 and 0 < record["test_acc"] <= 1
    assert not (tmp_path / "real-cnn" / "alone-s0" / experiment.DIVERGED_FILE).exists()
    assert "seed 0 diverged" not in report([calm], tmp_path)  # stale under today's options: hinton's too


def test_run_keys_of_recorded_runs_survive_new_setting_fields():
    """A Setting field added after runs were recorded (augment) leaves those runs' keys as they
    were at its default, and changes the key when set: the committed records are the oracle."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "real-cnn"
    recorded = {p.parent.name: json.loads(p.read_text()) for p in results.glob("*-s*/record.json")}
    assert len(recorded) >= 10
    for name, record in recorded.items():
        strategy, seed = name.rsplit("-s", 1)
        assert experiment.run_key(experiment.REAL_SETTINGS["real-cnn"], strategy, int(seed)) == record["run_key"], name
    noaug = experiment.REAL_SETTINGS["real-cnn-noaug"]
    assert not noaug.augment and noaug.epochs == experiment.REAL_SETTINGS["real-cnn"].epochs
    assert experiment.run_key(replace(noaug, name="real-cnn"), "hinton", 0) != recorded["hinton-s0"]["run_key"]
    resnet_noaug = experiment.REAL_SETTINGS["real-resnet-noaug"]  # (ii) without augmentation: only that differs
    assert replace(resnet_noaug, name="real-resnet", augment=True, description="") == replace(
        experiment.REAL_SETTINGS["real-resnet"], description="")
    # (ii)'s teacher into (iii)'s student: only the teacher differs from (iii), and its committed records
    # still carry the keys this setting gives them
    vit, resnet_vit = experiment.REAL_SETTINGS["real-vit"], experiment.REAL_SETTINGS["real-resnet-vit"]
    teacher_of = lambda s: {k: getattr(s, k) for k in ("teacher", "teacher_kwargs", "teacher_zoo")}  # noqa: E731
    assert teacher_of(resnet_vit) == teacher_of(experiment.REAL_SETTINGS["real-resnet"]) != teacher_of(vit)
    assert replace(resnet_vit, name="real-vit", description="", **teacher_of(vit)) == replace(vit, description="")
    # (ii) from the 90% deep teacher: only the teacher differs from (ii), and it is the shipped recipe's net
    resnet, w32 = experiment.REAL_SETTINGS["real-resnet"], experiment.REAL_SETTINGS["real-resnet-w32"]
    assert replace(w32, name="real-resnet", description="", **teacher_of(resnet)) == replace(resnet, description="")
    assert (w32.teacher, w32.teacher_kwargs) == (zoo.RECIPES[w32.teacher_zoo].model, zoo.RECIPES[w32.teacher_zoo].model_kwargs)
    vit_records = list((results.parent / "real-resnet-vit").glob("*-s*/record.json"))
    assert len(vit_records) >= 8
    for file in vit_records:
        strategy, seed = file.parent.name.rsplit("-s", 1)
        assert experiment.run_key(resnet_vit, strategy, int(seed)) == json.loads(file.read_text())["run_key"], file


def test_plan_pattern_table_names_unmatched_columns():
    """Two student layers on one teacher layer: the one-to-one matching leaves one column without a
    teacher, and the table says so instead of printing None."""
    import numpy as np

    from align_kd.graph import stability

    st = stability([np.array([[1.0, 1.0], [0.0, 0.0]])])  # (T, S): both student columns on the first teacher layer
    assert sorted(st["modal_matching"].values(), key=lambda tf: tf[1]) == [(None, 0.0), ("T0", 1.0)]
    row = {"strategy": "softmax", "lambda_std": 0.0, "tv_between_seeds": 0.0, "crossings": 0.0, "depth_corr": float("nan"),
           "fan_in": 1.0,
           "modal_matching": {s: [t, f] for s, (t, f) in st["modal_matching"].items()},
           "dominant_teacher": {s: [t, f] for s, (t, f) in st["modal_dominant"].items()}}
    line = experiment.format_patterns([row]).strip().splitlines()[-1]
    assert line.count("<-T0 (100%)") == 3 and line.count("<-unmatched") == 1 and "None" not in line


def test_plan_pattern_table_names_each_columns_dominant_teacher_across_seeds():
    """A fan-in plan (both student layers on T0 in two seeds, S1 on T1 in the third): the dominant
    teacher column shows what the plan uses, with the share of seeds that agree."""
    fan_in = [[0.9, 0.8], [0.1, 0.2]]  # (T, S)
    other = [[0.9, 0.3], [0.1, 0.7]]
    runs = [{"strategy": "softmax", "seed": k, "plan": p, "teacher_layers": ["T0", "T1"], "student_layers": ["S0", "S1"]}
            for k, p in enumerate([fan_in, fan_in, other])]
    (row,) = experiment.plan_patterns(runs)
    assert row["dominant_teacher"] == {"S0": ["T0", 1.0], "S1": ["T0", pytest.approx(2 / 3)]}
    # the one-to-one matching cannot put both columns on T0: it is not what the plan uses
    assert row["modal_matching"]["S1"][0] != "T0"
    line = experiment.format_patterns([row]).strip().splitlines()[-1]
    assert "| S0<-T0 (100%), S1<-T0 (67%) |" in line
    # depth correlation, mean over seeds, by hand: the fan-in plan's weights 0.45 / 0.4 / 0.05 / 0.1 on
    # (i, j) = (0,0) / (0,1) / (1,0) / (1,1) give E[i] 0.15, E[j] 0.5, E[ij] 0.1, so cov 0.025, var 0.1275
    # and 0.25; the other's 0.45 / 0.15 / 0.05 / 0.35 give cov 0.35 - 0.4 * 0.5 = 0.15, var 0.24 and 0.25
    expected = (2 * 0.025 / (0.1275 * 0.25) ** 0.5 + 0.15 / (0.24 * 0.25) ** 0.5) / 3
    assert row["depth_corr"] == pytest.approx(expected, rel=1e-6)  # the plans pass through float32
    assert f"| {row['depth_corr']:+.2f} |" in line
    # a tie between teacher layers goes to the shallowest
    import numpy as np

    from align_kd.graph import stability

    tie = stability([np.array([[0.2], [0.8]]), np.array([[0.8], [0.2]])])["modal_dominant"]  # one run each
    assert tie == {"S0": ("T0", 0.5)}


@pytest.mark.parametrize("setting", sorted(experiment.REAL_SETTINGS))
def test_every_row_is_a_valid_fit_config(setting):
    """A typo in a row's options (a misspelt field, a value out of range) is caught here, not hours into
    a benchmark: every row of every `real` setting builds fit()'s config, and the row variants keep
    the plan and the options they name."""
    from align_kd.config import FitConfig

    for strategy in experiment.ALL_STRATEGIES:
        plan, opts = experiment._fit_options(experiment.REAL_SETTINGS[setting], strategy, 0, False)
        cfg = FitConfig(strategy=plan, **opts)
        if strategy in experiment.PLAN_VARIANTS:
            base, extra = experiment.PLAN_VARIANTS[strategy]
            assert cfg.strategy == base and all(getattr(cfg, k) == v for k, v in extra.items())
    # the learned plan on DKD carries DKD at its paper's settings, as the dkd row does
    dkd = experiment._fit_options(experiment.REAL_SETTINGS[setting], "dkd", 0, False)[1]
    _, sinkhorn_dkd = experiment._fit_options(experiment.REAL_SETTINGS[setting], "sinkhorn-dkd", 0, False)
    assert {k: sinkhorn_dkd[k] for k in dkd} == dkd


def test_heldout_signal_leaves_the_dustbin_row_out():
    """benchmarks/heldout_signal.py on a planted dustbin run: every teacher pair hurts (H > 0, t >> 2)
    and the dustbin row is 0 by construction, so the shares count the T x S teacher pairs only and
    each column's least harmful teacher layer is the one planted lowest, never '(no teacher)'."""
    import importlib
    import sys

    from align_kd.plans.registry import DUSTBIN

    sys.path.insert(0, str(Path(experiment.__file__).resolve().parents[1] / "benchmarks"))
    try:
        signal = importlib.import_module("heldout_signal")
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    ups = []
    for k in range(8):
        h = np.zeros((3, 2))  # rows: block1, block2, the dustbin; columns: two student layers
        h[0] = 2.0 + 0.1 * rng.standard_normal(2)  # block1 hurts more
        h[1] = 1.0 + 0.1 * rng.standard_normal(2)
        ups.append({"kind": "heldout", "step": 10 * (k + 1), "hypergrad": h.tolist()})
    result = {"teacher_layers": ["block1", "block2", DUSTBIN], "student_layers": ["s1", "s2"], "solves": ups}
    (part,) = signal.signal_by_part(result, parts=1)
    assert np.array(part["t"]).shape == (2, 2)
    assert part["share_hurts"] == 1.0 and part["share_helps"] == 0.0
    assert part["lowest_row_per_column"] == ["block2", "block2"]
