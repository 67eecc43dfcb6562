"""Runs one ``vaeuda`` engine command as a child process and watches it without blocking.

Plain Python (no Slicer, no Qt, no torch), so it is tested outside Slicer against a fake
engine. The Slicer module's logic starts one :class:`EngineProcess` per job, drains its
:meth:`EngineProcess.events` from a ``qt.QTimer`` (or a loop, for blocking batch calls), and
turns the outcome into a :class:`JobResult`.
"""
from __future__ import annotations

import collections
import io
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


@dataclass
class JobResult:
    """How an engine job ended. ``status``: "done", "failed" or "cancelled"; ``message``: the
    engine's error sentence when failed; ``outputs``: files the engine reported; ``value``: what
    the logic call returns (a node, a model path...)."""
    status: str
    message: str = ""
    outputs: List[str] = field(default_factory=list)
    value: object = None


class JobFailedError(RuntimeError):
    """An engine job failed; the message is the engine's one-sentence explanation."""


class JobCancelledError(JobFailedError):
    """An engine job was cancelled; nothing was added to the scene."""


def parseEngineLine(line: str) -> dict:
    """One line of engine output -> an event dict (see vaeuda/progress.py). Plain text becomes a log event."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):     # (objects nested past Python's recursion limit)
            event = None
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            return event
    return {"event": "log", "message": text}


class EngineProcess:
    """One ``vaeuda`` child process, watched without blocking the caller. Plain Python, no Slicer.

    Two reader threads turn stdout lines into event dicts (JSON progress lines, other text as
    ``log`` events) and stderr lines into ``log`` events, in one queue that the caller drains
    with :meth:`events` on its own thread. The child runs in its own process group (POSIX
    session / Windows process group) so that :meth:`cancel` kills it with all its children.
    """

    # After the child exits, how long to wait for the readers to reach the end of its output
    # (a grandchild that inherited the pipes could otherwise keep them open).
    READER_GRACE_S = 2.0
    # The longest message an event carries on (to the log, the panel, the failure sentence), in characters.
    MAX_LINE_CHARS = 2000

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.process: Optional[subprocess.Popen] = None
        self.cancelRequested = False
        self.errorMessage: Optional[str] = None    # from an {"event": "error"} line ("" if it had no text)
        self.outputs: List[str] = []               # from the {"event": "done"} line
        self.doneSeen = False                      # the engine reported success (the protocol's "done")
        self.interruptedMessage: Optional[str] = None   # from an {"event": "interrupted"} line (SIGTERM, Ctrl-C)
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._stderrTail = collections.deque(maxlen=20)
        self._readers: List[threading.Thread] = []
        self._exitTime: Optional[float] = None

    def start(self) -> None:
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, **kwargs)
        # Lines end at "\n" only: text mode's universal newlines would make every "\r" of a progress
        # bar another line.
        self._stdout, self._stderr = (io.TextIOWrapper(pipe, encoding="utf-8", errors="replace", newline="\n")
                                      for pipe in (self.process.stdout, self.process.stderr))
        self._readers = [threading.Thread(target=self._readStdout, daemon=True),
                         threading.Thread(target=self._readStderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _readStdout(self) -> None:
        for line in self._stdout:
            # Whatever a line holds, reading goes on: a reader that stopped would leave the engine
            # blocked on a full pipe, and the job waiting for it forever.
            try:
                event = parseEngineLine(line)
                if isinstance(event.get("message"), str):
                    event["message"] = event["message"][:self.MAX_LINE_CHARS]
                self._note(event)
            except Exception:
                event = {"event": "log", "message": line.rstrip("\r\n")[:self.MAX_LINE_CHARS]}
            self._events.put(event)

    def _note(self, event: dict) -> None:
        """Keep what the job's end needs from the protocol's own events; a field of the wrong type
        counts as missing."""
        message = event.get("message")
        message = message if isinstance(message, str) else ""
        if event["event"] == "error":
            self.errorMessage = message
        elif event["event"] == "interrupted":
            self.interruptedMessage = message
        elif event["event"] == "done":
            outputs = event.get("outputs")
            self.outputs = [p for p in outputs if isinstance(p, str)] if isinstance(outputs, list) else []
            self.doneSeen = True

    def _readStderr(self) -> None:
        for line in self._stderr:
            text = line.rstrip("\r\n").rsplit("\r", 1)[-1]   # a line a progress bar redrew: its last state
            if text:
                text = text[:self.MAX_LINE_CHARS]
                self._stderrTail.append(text)
                self._events.put({"event": "log", "message": text, "stream": "stderr"})

    def events(self, timeout: float = 0.0, limit: Optional[int] = None) -> List[dict]:
        """Events that arrived since the last call, at most ``limit`` of them (the rest wait for the
        next call); waits up to ``timeout`` seconds for the first one."""
        got = []
        try:
            got.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
            while limit is None or len(got) < limit:
                got.append(self._events.get_nowait())
        except queue.Empty:
            pass
        return got

    def isFinished(self) -> bool:
        """True once the child has exited and its output has been read and taken; or, once the grace
        time has passed, whatever is left (what it started is then killed: it still held the pipes)."""
        if self.process is None or self.process.poll() is None:
            return False
        if self._exitTime is None:
            self._exitTime = time.monotonic()
        if not self._outputHeld():
            return self._events.empty()
        if time.monotonic() - self._exitTime > self.READER_GRACE_S:
            # (a process outside the group that still holds them: give up on what it would print)
            held = self._killHolders()
            return self._events.empty() or held
        return False

    def _killGroup(self) -> None:
        """Kill the child's process group: the child, or what it started and left running."""
        if self.process is None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))   # no console flashes up
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):     # (no member left)
                pass

    def _killHolders(self) -> bool:
        """Kill the child's group and let the readers meet the end of the pipes its end closes;
        True if something outside the group still holds them."""
        self._killGroup()
        for reader in self._readers:
            reader.join(timeout=self.CLOSE_WAIT_S)
        return self._outputHeld()

    def _outputHeld(self) -> bool:
        """Whether something still holds the child's output pipes open (the readers have not met
        their end): the child, or what it started. Once the child has exited, its group is killed
        only then: what holds the pipes is most likely in it, while a group that may be empty could
        have had its number taken again by another program's group."""
        return any(reader.is_alive() for reader in self._readers)

    # How long close waits for the readers to meet the end of the pipes once the group is killed.
    CLOSE_WAIT_S = 1.0

    def close(self) -> None:
        """Once the job has ended: kill what the child left running with the pipes still open, and
        close the pipes, so that no reader thread or descriptor outlives the job."""
        if self._outputHeld() and self._killHolders():     # a process outside the group holds them:
            return                                          # the readers stay
        for pipe in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
            if pipe is not None:
                try:
                    pipe.close()
                except (OSError, ValueError):
                    pass

    @property
    def succeeded(self) -> bool:
        """The protocol's success: exit status 0, a "done" event and no "error" event."""
        return self.returncode == 0 and self.errorMessage is None and self.doneSeen

    @property
    def returncode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    # How long cancel waits for the killed child to be reaped; it does not block the caller longer
    # (a GPU process can take seconds to tear down; the caller's next poll sees the end anyway).
    KILL_WAIT_S = 5.0

    def cancel(self, evenIfEnded: bool = False) -> None:
        """Kill the child and everything it started; returns when the child is gone (or after
        KILL_WAIT_S). A child that has already exited is left as it ended, its result standing,
        unless ``evenIfEnded`` and it succeeded: then it is marked cancelled all the same (its
        result is void). A failure stands either way: its sentence says what went wrong."""
        if self.process is not None and self.process.poll() is not None:
            self.cancelRequested = self.cancelRequested or (evenIfEnded and self.process.returncode == 0)
            if self._outputHeld():      # what it started still runs, holding the pipes open
                self._killGroup()
            return
        self.cancelRequested = True
        if self.process is None:
            return
        self._killGroup()
        try:
            self.process.wait(timeout=self.KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass

    def failureMessage(self) -> str:
        """The engine's error sentence; else its last stderr line; else the exit status."""
        if self.errorMessage:
            return self.errorMessage
        for line in reversed(self._stderrTail):
            if line.startswith("vaeuda: error: "):
                return line[len("vaeuda: error: "):]
        if self.errorMessage is not None:
            return "the VAE-UDA engine reported an error without saying what it was."
        if self.interruptedMessage is not None:   # its checkpoint was in the job's folder, which is gone
            reason = self.interruptedMessage.split(";")[0] or "interrupted"
            return f"the VAE-UDA engine was stopped before it finished ({reason}); nothing was kept."
        code = self.returncode
        if code is not None and code < 0:   # killed by a signal: its last stderr line is not the reason
            try:
                name = signal.Signals(-code).name
            except ValueError:              # (a real-time signal has no name)
                name = f"signal {-code}"
            return (f"the VAE-UDA engine was killed by {name}"
                    + (" (out of memory? the system's OOM killer sends it)."
                       if -code == getattr(signal, "SIGKILL", None) else "."))
        if self._stderrTail and _LAUNCHER_CRASH.match(self._stderrTail[-1]):
            # Slicer's PythonSlicer is a launcher: its Python child killed by a signal is this line, exit 1
            return "the VAE-UDA engine crashed or was killed (out of memory? the system's OOM killer kills it)."
        if code == 0 and not self.doneSeen:
            return "the VAE-UDA engine ended without reporting its result."
        if self._stderrTail:
            return f"the VAE-UDA engine stopped with an error: {self._stderrTail[-1]}"
        return f"the VAE-UDA engine stopped with exit status {code}."


# What CTK's application launcher (PythonSlicer) prints when the program it runs ends abnormally.
_LAUNCHER_CRASH = re.compile(r"^error: \[.*\] exit abnormally - Report the problem\.$")
