"""The command line: --help of every command, and the main job end to end on a few hundred images."""
import json
import os
import subprocess
import sys

import pytest
import torch

from align_kd.__main__ import build_parser, main
from shared_archive import ARCHIVE, REPO

torch.set_num_threads(1)

COMMANDS = ["demo", "fit", "select", "bench", "graph", "zoo"]


@pytest.fixture(scope="module")
def decoded_data(tmp_path_factory):
    """A folder of decoded CIFAR-10 caches shared by this module's tests (decoded once, on first use)."""
    return tmp_path_factory.mktemp("cli_data")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch, decoded_data):
    """Each test gets its own cache (its own teachers), never the user's ~/.cache/align_kd; only the
    decoded images are shared, so the outcome cannot depend on test order or machine state."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (decoded_data / "cifar10").mkdir(exist_ok=True)
    (cache / "cifar10").symlink_to(decoded_data / "cifar10", target_is_directory=True)
    monkeypatch.setenv("ALIGN_KD_CACHE", str(cache))
    return cache


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "align_kd", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for cmd in COMMANDS:
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m align_kd {cmd}" in text
    assert "--" in text  # documents its options


def test_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["fit", "--strategy", "magic"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_quick_end_to_end_then_graph(tmp_path, capsys):
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    out = tmp_path / "demo"
    strategies = ["alone", "hinton", "uniform", "sinkhorn", "exact"]
    assert main(["demo", "--quick", "--out", str(out), "--data", data, "--no-progress", "--strategies", *strategies]) == 0
    printed = capsys.readouterr().out
    run_dir = out / "demo"
    for name in ("table.md", "results.json", "accuracy.png", "alignment.png"):
        assert (run_dir / name).stat().st_size > 0, name
    table = (run_dir / "table.md").read_text()
    for s in ["teacher", *strategies]:
        assert f"| {s} |" in table
    assert "| teacher |" in printed
    patterns = table.split("Learned plans across seeds")[1]
    assert "| sinkhorn |" in patterns and "| exact |" in patterns and "| uniform |" not in patterns
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == strategies
    for r in results["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["dataset"] == "cifar10" and r["seed"] == 0
        plan = torch.tensor(r["plan"])
        if r["strategy"] in ("uniform", "sinkhorn", "exact"):
            assert torch.allclose(plan.sum(0), torch.ones(plan.shape[1]), atol=1e-4)
    assert results["versions"]["torch"] == torch.__version__

    # the graph command on one of the demo's runs, compared with another
    sink, uni = run_dir / "sinkhorn-s0", run_dir / "uniform-s0"
    assert main(["graph", str(sink), "--compare", str(uni), "--out", str(tmp_path / "g")]) == 0
    report = capsys.readouterr().out
    assert "pool1" in report and "crossings" in report.lower()
    for name in ("alignment.png", "plan_heatmap.png", "alignment.graphml"):
        assert (tmp_path / "g" / name).stat().st_size > 0


def test_fit_command_writes_a_run(tmp_path, capsys):
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    assert main(["fit", "--quick", "--teacher", "cnn", "--teacher-kwargs", '{"width": 8}', "--student", "mlp",
                 "--student-kwargs", '{"hidden": [64]}', "--strategy", "sinkhorn", "--out", str(tmp_path),
                 "--data", data, "--no-progress"]) == 0
    run = json.loads((tmp_path / "cli" / "sinkhorn-s0" / "result.json").read_text())
    assert run["config"]["strategy"] == "sinkhorn"
    assert run["student_layers"][-1] == "head" and len(run["plan"][0]) == len(run["student_layers"])


def test_select_command_ranks_the_candidates_then_trains_the_choice(tmp_path, capsys):
    from align_kd.experiment import _fit_options, quick, select_for_setting, Setting

    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    pair = ["--quick", "--teacher", "cnn", "--teacher-kwargs", '{"width": 8}', "--student", "mlp", "--student-kwargs",
            '{"hidden": [64]}', "--out", str(tmp_path), "--data", data, "--no-progress", "--search-epochs", "1"]
    candidates = ["pairwise", "sinkhorn", "hinton"]
    assert main(["select", *pair, "--candidates", *candidates, "--fit"]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / "cli" / "select-short1-s0"
    sel = json.loads((folder / "selection.json").read_text())
    best = max(sel["scores"].values())
    assert sel["choice"] == next(c for c in candidates if sel["scores"][c] == best)  # ties: the earlier candidate
    assert sorted(sel["ranking"]) == sorted(candidates) and sel["ranking"][0] == sel["choice"]
    assert f"choice: {sel['choice']}" in printed and f"| **{best:.4f}** |" in printed
    # every candidate ran with its benchmark row's options (the short schedule: epochs = search epochs)
    setting = quick(Setting("cli", "cnn", {"width": 8}, "mlp", {"hidden": [64]}))
    for row in candidates:
        name, opts = _fit_options(setting, row, 0, False)
        ran = json.loads((folder / f"{row}.json").read_text())["options"]
        assert ran == {"strategy": name, **opts, "epochs": 1}, row
    # --fit trained the choice on all the training data, as `bench`/`fit` would have
    record = json.loads((tmp_path / "cli" / f"{sel['choice']}-s0" / "record.json").read_text())
    assert record["strategy"] == sel["choice"] and record["train_images"] == 512
    # a rerun reads every candidate back and chooses the same
    assert main(["select", *pair, "--candidates", *candidates]) == 0
    again = capsys.readouterr().out
    assert again.count("(read back)") == 3 and f"choice: {sel['choice']}" in again and "rerun this command with --fit" in again
    # with the lowest-scoring candidate as the fallback: still nothing trains, and the best stays the choice only if
    # it beats the fallback significantly
    worst = min(reversed(candidates), key=lambda c: sel["scores"][c])
    assert sel["scores"][worst] < best  # planted: the fallback is not the best, so the test runs
    assert main(["select", *pair, "--candidates", *candidates, "--fallback", worst]) == 0
    tested = capsys.readouterr().out
    rule = json.loads((folder / "selection.json").read_text())
    assert tested.count("(read back)") == 3 and rule["best"] == sel["choice"] and rule["fallback"] == worst
    test = rule["mcnemar"]
    assert test["candidate"] == sel["choice"] and test["fallback"] == worst and f"p = {test['p_value']:.4f}" in tested
    assert rule["choice"] == (sel["choice"] if test["p_value"] < 0.05 else worst)
    assert test["candidate_only"] - test["fallback_only"] == round((best - sel["scores"][worst]) * sel["heldout_images"])
    assert f"choice: {rule['choice']}" in tested
    # a search of another length keeps its own folder: it neither reads back nor overwrites the 1-epoch candidates
    first = (folder / "pairwise.json").read_bytes()
    longer = select_for_setting(setting, 0, ["pairwise", "hinton"], search_epochs=2, schedule="short", out_dir=tmp_path,
                                data_root=data)[0]
    assert longer.cached == [] and len(longer.curves["pairwise"]) == len(longer.curves["hinton"]) == 2
    assert (tmp_path / "cli" / "select-short2-s0" / "pairwise.json").exists() and (folder / "pairwise.json").read_bytes() == first
    with pytest.raises(ValueError, match="retrain row"):
        select_for_setting(setting, 0, ["pairwise", "softmax-retrain"], search_epochs=1, out_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="distinct candidates"):
        select_for_setting(setting, 0, ["pairwise", "pairwise"], search_epochs=1, out_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="`fallback` to be one of the candidates"):
        select_for_setting(setting, 0, ["pairwise", "sinkhorn"], search_epochs=1, fallback="hinton", out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bench_quick_writes_the_benchmark_outputs(tmp_path, capsys):
    data = os.environ.get("ALIGN_KD_DATA", str(ARCHIVE))
    strategies = ["alone", "pairwise", "sinkhorn", "exact"]
    assert main(["bench", "--quick", "--settings", "resnet-mlp", "--strategies", *strategies, "--out", str(tmp_path),
                 "--data", data, "--no-progress"]) == 0
    out = tmp_path / "resnet-mlp"
    results = json.loads((out / "results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == strategies
    keys = {"dataset", "setting", "strategy", "seed", "test_acc", "best_acc", "epochs", "teacher_acc", "wall_s"}
    assert all(keys <= set(r) for r in results["runs"])
    assert results["setting"]["name"] == "resnet-mlp" and results["seeds"] == [0]
    assert {p["strategy"] for p in results["plan_patterns"]} == {"sinkhorn", "exact"}
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "alignment.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["bench", "--quick", "--settings", "resnet-mlp", "--status", "--out", str(tmp_path)]) == 0
    status = capsys.readouterr().out  # the table rows, finished ones with their accuracy; nothing trained
    acc = {r["strategy"]: r["test_acc"] for r in results["runs"]}
    assert f"| alone | {acc['alone']:.4f} |" in status and f"| exact | {acc['exact']:.4f} |" in status
    assert "| hinton | to run |" in status and "| dkd | to run |" in status
    assert "5 runs left" in status and "not timed (no finished run of their row yet)" in status


def test_bench_report_adds_the_diagnostic_settings_that_have_runs(tmp_path, capsys):
    assert main(["bench", "--protocol", "real", "--report", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "### real-cnn:" in first and "### real-vit:" in first and "real-cnn-noaug" not in first
    (tmp_path / "real-cnn-noaug").mkdir()
    assert main(["bench", "--protocol", "real", "--report", "--out", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert "### real-cnn-noaug:" in second and "no finished runs yet" in second
