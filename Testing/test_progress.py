"""progress.Reporter: what each mode writes where (the Slicer module reads stdout in JSON mode)."""
import json

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


def test_json_mode_throttles_steps_to_two_a_second(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 1.2, 1.6, 2.0])
    monkeypatch.setattr("vaeuda.progress.time.monotonic", lambda: next(clock))
    reporter = Reporter("json")
    reporter.stage("source", 10)
    for step in (1, 2, 3, 4):                    # at 1.0, 1.2 (< 0.5 s after 1.0: dropped), 1.6, 2.0 (dropped)
        reporter.step(step)
    steps = [json.loads(line).get("step") for line in capsys.readouterr().out.splitlines()]
    assert steps == [None, 1, 3]
