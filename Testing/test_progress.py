"""progress.Reporter: what each mode writes where (the Slicer module reads stdout in JSON mode)."""
import json

import pytest

from vaeuda.progress import Reporter


def _fake_clock(monkeypatch, *seconds: float) -> None:
    """time.monotonic, as progress reads it, gives these readings in turn."""
    clock = iter(seconds)
    monkeypatch.setattr("vaeuda.progress.time.monotonic", lambda: next(clock))


def _json_events(capsys) -> list:
    """The JSON events written on stdout so far."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_none_mode_shows_no_progress_but_keeps_log_lines_on_stderr(capsys):
    reporter = Reporter("none")
    reporter.stage("adapt", 4)
    reporter.step(2, loss=1.5)
    reporter.log("preset cpu (no CUDA GPU)")
    reporter.close()
    out, err = capsys.readouterr()
    assert out == "" and err == "preset cpu (no CUDA GPU)\n"


def test_json_mode_writes_events_on_stdout_only(capsys, monkeypatch):
    _fake_clock(monkeypatch, 100.0, 110.0, 130.0)          # stage starts at 100 s; steps at 110 s and 130 s
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
    _fake_clock(monkeypatch, 100.0, 100.0, 110.0)
    reporter = Reporter("json")
    reporter.stage("adapt", 250, start=200)
    reporter.step(200, force=True)
    reporter.step(210, force=True)
    events = _json_events(capsys)
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
    _fake_clock(monkeypatch, 0.0, 1.0, 1.2, 1.6, 2.0)
    reporter = Reporter("json")
    reporter.stage("source", 10)
    for step in (1, 2, 3, 4):                    # at 1.0, 1.2 (< 0.5 s after 1.0: dropped), 1.6, 2.0 (dropped)
        reporter.step(step)
    steps = [e.get("step") for e in _json_events(capsys)]
    assert steps == [None, 1, 3]


def test_listed_names_the_first_three_and_counts_the_rest():
    from vaeuda.progress import listed
    assert listed(["a"]) == "a" and listed(["a", "b", "c"]) == "a, b, c"
    assert listed(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"      # a count, not "..." before a full stop


def test_json_throttle_lets_through_forced_last_and_half_second_late_steps(capsys, monkeypatch):
    """Throttled to one line per 0.5 s, but a step 0.5 s after the last line (catches `<=`), a forced
    step and the stage's last step are written whatever the time since (catches either exception lost)."""
    _fake_clock(monkeypatch, 0.0, 1.0, 1.5, 1.75, 2.0)
    reporter = Reporter("json")
    reporter.stage("source", 10)
    reporter.step(1)                             # at 1.0: written
    reporter.step(2)                             # at 1.5: 0.5 s later, written
    reporter.step(3, force=True)                 # at 1.75: 0.25 s later, forced
    reporter.step(10)                            # at 2.0: 0.25 s later, the last step
    steps = [e.get("step") for e in _json_events(capsys)]
    assert steps == [None, 1, 2, 3, 10]


def test_a_new_stage_starts_its_own_throttle_and_clock(capsys, monkeypatch):
    """Stage b starts 0.1 s after stage a's last line: its first step (0.1 s in, 1 of 4: ETA 0.3 s) is
    still written, the throttle counting from b's start, not from a's last line."""
    _fake_clock(monkeypatch, 0.0, 1.0, 1.125, 1.25)
    reporter = Reporter("json")
    reporter.stage("a", 4)
    reporter.step(1)                             # at 1.0
    reporter.stage("b", 4)                       # at 1.125
    reporter.step(1)                             # at 1.25: 0.125 s in, ETA 3 x 0.125 = 0.375 -> 0.4
    events = _json_events(capsys)
    assert [(e["event"], e["stage"], e.get("step"), e.get("eta_s")) for e in events] == [
        ("stage", "a", None, None), ("progress", "a", 1, 3.0), ("stage", "b", None, None), ("progress", "b", 1, 0.4)]


def test_fraction_keeps_four_decimals_and_an_empty_stage_is_complete(capsys, monkeypatch):
    """1 of 3 steps is 0.3333 (not 0.33); a stage of 0 steps is done (fraction 1.0, no ETA: no step timed)."""
    _fake_clock(monkeypatch, 0.0, 3.0, 4.0, 5.0)
    reporter = Reporter("json")
    reporter.stage("source", 3)
    reporter.step(1)                             # 3 s for 1 of 3: ETA 6 s
    reporter.stage("empty", 0)
    reporter.step(0)
    events = _json_events(capsys)
    assert [(e.get("fraction"), e.get("eta_s")) for e in events if e["event"] == "progress"] == [(0.3333, 6.0),
                                                                                                (1.0, None)]


def test_each_json_line_is_written_whole_and_flushed(monkeypatch):
    """The Slicer module reads stdout through a pipe as lines arrive: each event is one write of the
    line and its newline, then a flush (a buffered line would reach it only at exit)."""
    import sys
    calls = []

    class Pipe:
        def write(self, text):
            calls.append(text)

        def flush(self):
            calls.append("<flush>")
    monkeypatch.setattr(sys, "stdout", Pipe())
    reporter = Reporter("json")
    reporter.stage("adapt", 4)
    reporter.log("early stop")
    assert calls == ['{"event": "stage", "stage": "adapt", "total": 4}\n', "<flush>",
                     '{"event": "log", "message": "early stop"}\n', "<flush>"]


def test_auto_mode_is_a_bar_when_stderr_is_a_terminal(monkeypatch):
    """The bar is drawn on stderr, so stderr decides: a terminal there gives "tty" even with stdout
    redirected; stdout on a terminal and stderr redirected gives "none" (catches the wrong stream asked)."""
    import sys

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty
    for err_tty, out_tty, mode in ((True, False, "tty"), (False, True, "none"), (False, False, "none")):
        monkeypatch.setattr(sys, "stderr", Stream(err_tty))
        monkeypatch.setattr(sys, "stdout", Stream(out_tty))
        assert Reporter("auto").mode == mode and Reporter().mode == mode


def test_tty_mode_draws_the_bar_on_stderr_from_a_resumed_step(capsys):
    """Resumed at 200 of 250: the bar starts at 200/250 (80%), shows step 210 (84%) as given with its
    loss; a log line is written through the bar (cleared, the line, the bar drawn again under it), and
    nothing goes to stdout. Catches the bar started at 0, the step shifted by the resumed start, metrics
    dropped, a log line printed over the bar, and the bar drawn on stdout."""
    reporter = Reporter("tty")
    reporter.stage("adapt", 250, start=200)
    reporter.step(210, loss=1.5)
    reporter.log("early stop")
    reporter.close()
    out, err = capsys.readouterr()
    assert out == ""
    frames = err.split("\r")
    assert frames[1].startswith("adapt:  80%") and " 200/250 " in frames[1]
    assert frames[2].startswith("adapt:  84%") and " 210/250 " in frames[2] and "loss=1.5]" in frames[2]
    before, after = err.split("\rearly stop\n")
    assert before.endswith(" " * 10) and " 210/250 " in after     # the bar blanked, then drawn again
    assert err.endswith("]\n")                                     # closed: its line ended
