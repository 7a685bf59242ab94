"""`baffle report`: tables beside the paper's values, partial runs, rebuild from the kept files."""
import json
import shutil

import pytest

from baffle.config import ConfigError, read_json_object, resolve
from baffle.paper import PAPER
from baffle.report import SECTIONS, Run, _sections, first_reaching, load_run, render
from test_cli import SMALL, baffle, metrics, uninterrupted_and_killed


def test_report_places_runs_beside_the_paper_and_marks_partial_runs(tmp_path):
    done = tmp_path / "table1-lenet-mnist-k100"
    baffle("run", *SMALL, "--rounds", "4", "--out", done)
    # pretend this tiny run is the paper preset, so its row gets the paper's cell
    config = json.loads((done / "config.json").read_text())
    config["preset"], config["dataset"] = "table1-lenet-mnist-k100", "mnist"
    (done / "config.json").write_text(json.dumps(config))
    (done / "notes.md").write_text("Ran on a quiet machine.\n")
    partial = tmp_path / "partial"
    shutil.copytree(done, partial)
    (partial / "notes.md").unlink()
    (partial / "summary.json").unlink()
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    out = tmp_path / "report"
    res = baffle("report", done, partial, "--out", out)
    assert f"wrote {out / 'README.md'}" in res.stdout
    text = (out / "README.md").read_text()
    final = json.loads(lines[-1])["test_top1"]
    cell = PAPER["table1-lenet-mnist-k100"]
    rows = [line for line in text.splitlines() if line.startswith("| table1-lenet-mnist-k100 |")]
    assert len(rows) == 2  # the accuracy table and the forward-passes-to-reach table
    row, reach = rows
    expected = [first_reaching(load_run(done), t) for t in (87.27, 89.48, 92.18)]
    assert reach.count("not reached by round 4 (last evaluated)") == sum(m is None for m in expected)
    for m in expected:  # the share of the paper's K=500 forward passes (20 x 10 x 187 x 501)
        if m is not None:
            assert f"{m['forward_passes']:.3g} ({100 * m['forward_passes'] / 18737400:.3g}%), round {m['round']}," in reach
    assert "| 4/4 |" in row and f"| {100 * final:.2f}% |" in row
    # the tiny run is not what the preset says: the row says so, naming the changed fields, and gives no gap
    assert "**differs from the preset as it is now: " in row and "num_perturbations=" in row and "rounds=4" in row
    assert f"{cell.top1:.2f}% (Table 1, LeNet MNIST, K=100) | - (not the preset's setting) |" in row
    row = next(line for line in text.splitlines() if line.startswith("| partial |"))
    assert "2/4 (partial)" in row and "(partial) |" in row
    # both runs are the table1 family: one section, its two plots, the note under it
    assert text.count("\n## Table 1: MNIST, 10 iid clients") == 1 and "\n## Other runs" not in text
    for png in ("table1_rounds.png", "table1_forward_passes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in text
    assert sorted(p.name for p in out.glob("*.png")) == ["table1_forward_passes.png", "table1_rounds.png"]
    assert "**table1-lenet-mnist-k100**: Ran on a quiet machine." in text and "**partial**" not in text
    kept = out / "runs"
    assert sorted(p.name for p in (kept / "partial").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert (kept / "table1-lenet-mnist-k100" / "summary.json").is_file()
    assert (kept / "table1-lenet-mnist-k100" / "notes.md").is_file()
    # rebuilt from the kept copies alone: the same report
    baffle("report", kept / done.name, kept / "partial", "--out", out)
    assert (out / "README.md").read_text() == text
    # a note written in a kept copy survives a rebuild from the run directory, which has none
    (kept / "partial" / "notes.md").write_text("Written in the repository.\n")
    baffle("report", done, partial, "--out", out)
    assert "**partial**: Written in the repository." in (out / "README.md").read_text()
    # a run resumed from a copy of its kept directory carries the note as it was then: an edit of the
    # kept note made since is not overwritten, and the report says which one it kept
    (partial / "notes.md").write_text("Written in the repository.\n")
    (kept / "partial" / "notes.md").write_text("Written in the repository. Edited since.\n")
    res = baffle("report", done, partial, "--out", out)
    assert (kept / "partial" / "notes.md").read_text() == "Written in the repository. Edited since.\n"
    assert "**partial**: Written in the repository. Edited since." in (out / "README.md").read_text()
    assert res.stderr.strip() == (f"baffle report: kept {kept / 'partial' / 'notes.md'}, which differs from "
                                  f"{partial / 'notes.md'}: edit the kept one")
    (partial / "notes.md").unlink()
    # a rebuild whose runs are all in another section leaves no plot of the old section behind
    config["preset"] = "ablation-lenet-mnist-k100-relu"
    (partial / "config.json").write_text(json.dumps(config))
    baffle("report", partial, "--out", out)
    assert sorted(p.name for p in out.glob("*.png")) == ["ablation_forward_passes.png", "ablation_rounds.png"]


def test_a_section_whose_only_run_has_no_round_yet_still_gets_its_plots(tmp_path):
    run = tmp_path / "just-started"
    run.mkdir()
    config = resolve("deviation-wrn-mnist-k100-lr0.001", {}).to_dict()
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("")
    out = tmp_path / "report"
    baffle("report", run, "--out", out)
    for png in ("deviation_rounds.png", "deviation_forward_passes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| just-started | wrn-10-2 mnist, baffle fedavg, K=100, 10 iid clients, client adam 0.001," in (
        out / "README.md").read_text()


def test_a_partial_run_resumes_from_its_kept_copy_on_another_machine(tmp_path):
    full, part = uninterrupted_and_killed(tmp_path, rounds=12, after=4)
    out = tmp_path / "report"
    baffle("report", part, "--out", out)
    kept = out / "runs" / "part"
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    # the kept copy alone, moved elsewhere (the repository on a fresh machine), finishes the run exactly
    moved = tmp_path / "fresh-machine" / "part"
    shutil.copytree(kept, moved)
    baffle("run", "--resume", moved)
    assert metrics(moved) == metrics(full)
    # once finished, its kept copy drops the checkpoint and gains the summary
    baffle("report", moved, "--out", out)
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]
    # ... so it has nothing to resume: refused, not retrained from round 1 over its finished metrics
    before = (kept / "metrics.jsonl").read_bytes()
    again = baffle("run", "--resume", kept, check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"baffle: error: cannot resume {kept}: the run has finished (summary.json) and holds no checkpoint.pt"]
    assert (kept / "metrics.jsonl").read_bytes() == before


def test_a_left_over_summary_does_not_make_a_partial_runs_copy_look_finished(tmp_path):
    _, part = uninterrupted_and_killed(tmp_path, rounds=12, after=4)
    (part / "summary.json").write_text('{"rounds": 12}')  # e.g. from an earlier life of the directory
    assert not load_run(part).finished
    baffle("report", part, "--out", tmp_path / "report")
    kept = tmp_path / "report" / "runs" / "part"
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def stop_after(n: int):
    """An on_round callback that kills the run (nothing saved on the way out) once round ``n`` is checkpointed."""
    from test_cli import Killed

    def on_round(row):
        if row["round"] == n:
            raise Killed
    return on_round


def copy_on_a_full_disk(monkeypatch, run, out, failing: str) -> None:
    """``baffle report`` of ``run`` into ``out`` that stops (OSError) when it comes to write ``failing``."""
    from baffle import report
    real = report.atomic_write

    def full_disk(path, data):
        if path.name == failing:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(report, "atomic_write", full_disk)
    with pytest.raises(OSError):
        report.build_report([run], out)
    monkeypatch.setattr(report, "atomic_write", real)


@pytest.mark.parametrize("failing, finished", [  # the files each copy writes: no summary, or no checkpoint
    ("config.json", False), ("metrics.jsonl", False), ("checkpoint.pt", False),
    ("config.json", True), ("metrics.jsonl", True), ("summary.json", True)])
def test_a_report_stopped_while_copying_leaves_a_copy_that_resumes_exactly(tmp_path, monkeypatch, failing, finished):
    """A report that stops midway through a kept copy (Ctrl-C, a full disk) leaves every metric
    line of the copy's checkpoint (the copy is written config and metrics first), and never
    metrics with neither checkpoint nor summary (a resume would start over from round 1)."""
    from baffle import report, runs
    from baffle.config import RunConfig
    from test_cli import MIDWAY, Killed

    config = RunConfig(**{**MIDWAY, "rounds": 4}).validate()
    full, run, out = tmp_path / "full", tmp_path / "run", tmp_path / "report"
    runs.execute(config, full)
    with pytest.raises(Killed):
        runs.execute(config, run, on_round=stop_after(1))
    report.build_report([run], out)  # the copy at round 1
    if finished:
        runs.execute(config, run, resume=True)
    else:
        with pytest.raises(Killed):
            runs.execute(config, run, resume=True, on_round=stop_after(3))
    copy_on_a_full_disk(monkeypatch, run, out, failing)  # the copy of round 3 or 4 stops at `failing`
    kept = out / "runs" / "run"
    assert (kept / "checkpoint.pt").exists() or (kept / "summary.json").exists()
    moved = tmp_path / "elsewhere"
    shutil.copytree(kept, moved)
    runs.execute(config, moved, resume=True)
    assert metrics(moved) == metrics(full)


def test_a_run_of_the_preset_gets_its_gap_to_the_paper_and_its_share_of_the_paper_budget():
    config = resolve("table1-lenet-mnist-k100", {}).to_dict()
    per_round = 10 * 187 * 101  # clients x local steps x (K + 1) forward passes
    metrics = [{"round": r, "test_top1": acc, "forward_passes": per_round * r, "backward_passes": 0,
                "wall_seconds": 60.0 * r} for r, acc in ((1, 0.80), (2, 0.90), (3, None), (4, 0.91))]
    text = render([Run("k100", config, metrics, finished=False)])
    row, reach = [line for line in text.splitlines() if line.startswith("| k100 |")]
    assert "differs from the preset" not in row
    assert "| 4/20 (partial) | 91.00% | 91.00% | 87.27% (Table 1, LeNet MNIST, K=100) | +3.73 (partial) |" in row
    # 87.27% first at round 2 (377,740 passes of the paper's 18,737,400); 92.18% never, last seen at round 4
    assert reach == ("| k100 | 3.78e+05 (2.02%), round 2, 2.0 min | 3.78e+05 (2.02%), round 2, 2.0 min "
                     "| not reached by round 4 (last evaluated), partial |")
    # a run just started, nothing evaluated yet: no round 0 is invented
    text = render([Run("k100", config, [], finished=False)])
    row, reach = [line for line in text.splitlines() if line.startswith("| k100 |")]
    assert "| 0/20 (partial) | - | - |" in row
    assert reach == "| k100 | " + " | ".join(["no round evaluated yet, partial"] * 3) + " |"


def test_first_reaching_and_bad_input(tmp_path):
    run = tmp_path / "run"
    baffle("run", *SMALL, "--rounds", "2", "--eval-every", "1", "--out", run)
    r = load_run(run)
    top = max(m["test_top1"] for m in r.metrics)
    assert first_reaching(r, 100 * top)["test_top1"] == top
    assert first_reaching(r, 100 * top + 0.01) is None
    out = baffle("report", tmp_path, "--out", tmp_path / "rep", check=False)
    assert out.returncode == 2 and f"cannot read run directory {tmp_path}: no config.json there" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "rep").exists()


def test_sections_group_runs_by_preset_family():
    def run(name, preset):
        return Run(name, {"preset": preset, "model": "lenet", "dataset": "mnist"}, [], False)

    runs = [run("a", "quick"), run("b", "noniid-lenet-mnist-k200"), run("c", "table1-lenet-mnist-bp"),
            run("d", None), run("e", "fig2-lenet-mnist-fedsgd-k100"), run("f", "table1-wrn-mnist-k100"),
            run("g", "reach-lenet-mnist-k50"),
            run("h", "deviation-wrn-mnist-k100-lr0.001")]
    expected = [("table1", ["c", "f"]), ("fig2", ["e"]), ("noniid", ["b"]), ("reach", ["g"]), ("deviation", ["h"]),
                ("other", ["a", "d"])]
    assert [(s, [r.name for r in g]) for s, g in _sections(runs)] == expected
    # the order of the directories given (a shell glob's, which depends on the locale) does not matter
    assert [(s, [r.name for r in g]) for s, g in _sections(runs[::-1])] == expected
    assert render(runs[::-1]) == render(runs)
    # a name that is a prefix of another comes first, whatever the locale sorts "/" and "-" as
    pair = [run(name, "table1-lenet-mnist-bp") for name in ("table1-lenet-mnist-bp-fedsgd", "table1-lenet-mnist-bp")]
    assert [r.name for r in _sections(pair)[0][1]] == ["table1-lenet-mnist-bp", "table1-lenet-mnist-bp-fedsgd"]
    text = render(runs)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## " + SECTIONS[s] for s in ("table1", "fig2", "noniid", "reach", "deviation", "other")] + [
        "## Forward passes to first reach the paper's MNIST LeNet accuracies"]
    assert "| c | lenet mnist" in text and "| 0/? (partial) | - |" in text  # no metrics yet: nothing invented
    reach = text[text.index("## Forward passes to first reach"):]  # its rows in section order too
    assert [line.split(" | ")[0] for line in reach.splitlines() if line[:4] in {f"| {n} " for n in "abcdefgh"}] == [
        "| c", "| f", "| e", "| b", "| g", "| h", "| a", "| d"]
    bp = Run("bp", {"model": "lenet", "dataset": "mnist", "method": "backprop", "rounds": 2},
             [{"round": 1, "test_top1": 0.95, "forward_passes": 100, "backward_passes": 100, "wall_seconds": 60}], False)
    reach = next(line for line in render([bp]).splitlines() if line.startswith("| bp | 100 "))
    assert reach.startswith("| bp | 100 (0.000534%) + 100 backward, round 1, 1.0 min |")


def test_read_json_object_names_the_file_and_the_fault(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match=r"^cannot resume X: no config.json there$"):
        read_json_object(path, "cannot resume X")
    path.write_text('{"rounds": ')
    with pytest.raises(ConfigError, match=r"^cannot resume X: config.json is corrupt \(Expecting value"):
        read_json_object(path, "cannot resume X")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^cannot resume X: config.json is not a JSON object$"):
        read_json_object(path, "cannot resume X")
    path.write_text('{"rounds": 3}')
    assert read_json_object(path, "cannot resume X") == {"rounds": 3}
