"""progress.Reporter: what each mode writes where (the Slicer module reads stdout in JSON mode)."""
import json

import pytest

from vaeuda.progress import Reporter


def test_none_mode_shows_no_progress_but_keeps_log_lines_on_stderr(capsys):
    reporter = Reporter("none")
    reporter.stage("adapt", 4)
    reporter.step(2, loss=1.5)
    reporter.log("preset cpu (no CUDA GPU)")
    reporter.close()
    out, err = capsys.readouterr()
    assert out == "" and err == "preset cpu (no CUDA GPU)\n"


def test_json_mode_writes_events_on_stdout_only(capsys, monkeypatch):
    clock = iter([100.0, 110.0, 130.0])          # stage starts at 100 s; steps at 110 s and 130 s
    monkeypatch.setattr("vaeuda.progress.time.monotonic", lambda: next(clock))
    reporter = Reporter("json")
    reporter.stage("adapt", 4)
    reporter.step(1, loss=2.0)                   # 10 s for 1 of 4: ETA 30 s
    reporter.step(4)                             # the last step is always reported
    reporter.log("early stop")
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert err == ""
    assert events == [
        {"event": "stage", "stage": "adapt", "total": 4},
        {"event": "progress", "stage": "adapt", "step": 1, "total": 4, "fraction": 0.25, "eta_s": 30.0, "loss": 2.0},
        {"event": "progress", "stage": "adapt", "step": 4, "total": 4, "fraction": 1.0, "eta_s": 0.0},
        {"event": "log", "message": "early stop"},
    ]


def test_a_resumed_stage_counts_only_its_own_steps_in_the_eta(capsys, monkeypatch):
    """Resumed at step 200 of 250, 10 s for the next 10 steps: 40 s to go, not the 1.9 s that
    counting the 200 steps of the interrupted run would give."""
    clock = iter([100.0, 100.0, 110.0])
    monkeypatch.setattr("vaeuda.progress.time.monotonic", lambda: next(clock))
    reporter = Reporter("json")
    reporter.stage("adapt", 250, start=200)
    reporter.step(200, force=True)
    reporter.step(210, force=True)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e.get("step"), e.get("eta_s")) for e in events] == [(None, None), (200, None), (210, 40.0)]
    assert events[2]["fraction"] == 0.84


def test_json_lines_stay_json_with_a_non_finite_metric(capsys):
    """NaN and Infinity are not JSON (a strict reader, or another language's, refuses the line)."""
    reporter = Reporter("json")
    reporter.stage("source", 10)
    reporter.step(10, loss=float("nan"), seg=float("inf"), task=0.5)
    line = capsys.readouterr().out.splitlines()[-1]
    event = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert (event["loss"], event["seg"], event["task"]) == (None, None, 0.5)


def test_json_mode_throttles_steps_to_two_a_second(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 1.2, 1.6, 2.0])
    monkeypatch.setattr("vaeuda.progress.time.monotonic", lambda: next(clock))
    reporter = Reporter("json")
    reporter.stage("source", 10)
    for step in (1, 2, 3, 4):                    # at 1.0, 1.2 (< 0.5 s after 1.0: dropped), 1.6, 2.0 (dropped)
        reporter.step(step)
    steps = [json.loads(line).get("step") for line in capsys.readouterr().out.splitlines()]
    assert steps == [None, 1, 3]


def test_listed_names_the_first_three_and_counts_the_rest():
    from vaeuda.progress import listed
    assert listed(["a"]) == "a" and listed(["a", "b", "c"]) == "a, b, c"
    assert listed(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"      # a count, not "..." before a full stop
