"""Starting, watching and stopping the worker process (`<python> -m isseg.cli ...`), without Slicer or Qt.

The worker runs in its own process group (session on POSIX), so that cancelling can end it together with
every process it started. Its stdout is read by a background thread into a queue, so the GUI thread
never blocks on the pipe; its stderr goes to a log file in the run folder, which is what the user is
pointed to when something fails.
"""

import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .i18n import tr as _
from .protocol import CANCEL_FILE, parseEventLine

WORKER_MODULE = "isseg.cli"
PIPE_DRAIN_SECONDS = 5.0


class WorkerError(RuntimeError):
    """The worker could not be started or did not answer; the message says what to do."""


def workerCommand(pythonExecutable: str, arguments: list, module: str = WORKER_MODULE) -> list:
    """The command line that runs the worker CLI (or another `module`) with `arguments` (e.g. ["refine", ...])."""
    return [str(pythonExecutable), "-m", module, *[str(argument) for argument in arguments]]


def workerEnvironment(moduleDirectory: str, baseEnvironment: Optional[dict] = None) -> dict:
    """Environment for the worker: `baseEnvironment` (default: this process's) with `moduleDirectory`
    (the folder holding the `isseg` package) first on PYTHONPATH, and unbuffered output so that every
    event arrives as soon as it is printed."""
    environment = dict(os.environ if baseEnvironment is None else baseEnvironment)
    pythonPath = [str(moduleDirectory)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(pythonPath)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _processGroupOptions() -> dict:
    """Popen options that put the worker in a new process group, so that its whole tree can be ended."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


class WorkerProcess:
    """One running worker.

    `command` is the full command line, `outputDirectory` the run's output folder (where the cancel file
    goes; it must exist), `logPath` the file that receives the worker's stderr.
    """

    def __init__(self, command: list, outputDirectory: Path, logPath: Path, environment: Optional[dict] = None):
        self.outputDirectory = Path(outputDirectory)
        self.logPath = Path(logPath)
        self._events: "queue.SimpleQueue[dict]" = queue.SimpleQueue()
        self._cancelRequestedAt: Optional[float] = None
        self._cancelSignalled = False
        self._leftoversEnded = False
        self._exitSeenAt: Optional[float] = None
        with open(self.logPath, "wb") as log:
            try:
                self._process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    cwd=str(self.outputDirectory), env=environment, **_processGroupOptions())
            except OSError as error:
                raise WorkerError(_("Could not start the worker '{program}': {error}").format(
                    program=command[0], error=error.strerror or error)) from None
        self._reader = threading.Thread(target=self._readEvents, name="InferenceSpecificSeg worker output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _readEvents(self) -> None:
        """Background thread: every stdout line that holds an event goes to the queue; other lines
        (library noise, a half line cut off by a crash) are logged and dropped."""
        with self._process.stdout:
            for line in self._process.stdout:
                event = parseEventLine(line)
                if event is not None:
                    self._events.put(event)
                elif line.strip():
                    logging.debug("InferenceSpecificSeg worker printed a non-event line: %r", line[:200])

    def takeEvents(self) -> list:
        """All events that arrived since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def finished(self) -> bool:
        """True once the process has exited and all its output has been read into the queue. When the process
        is a launcher (PythonSlicer) that a signal ended, the interpreter it started may still be writing
        the partial result: wait while its process group lives (the cancel timeout kills it if need be).
        Otherwise, should something hold the pipe open, a few seconds after the exit suffice."""
        if self._process.poll() is None:
            return False
        if self._exitSeenAt is None:
            self._exitSeenAt = time.monotonic()
        if self._reader.is_alive():
            if self._process.returncode < 0 and self._processGroupAlive():
                return False
            if time.monotonic() - self._exitSeenAt < PIPE_DRAIN_SECONDS:
                return False
        if not self._leftoversEnded:
            # The worker is gone; end anything it left behind in its process group (once: afterwards the
            # group id is free and could in principle be reused).
            self._killProcessGroup()
            self._leftoversEnded = True
        return True

    @property
    def returnCode(self) -> Optional[int]:
        return self._process.poll()

    def requestCancel(self) -> None:
        """Ask the worker to stop by writing DIR/cancel; it then writes its partial result and exits. A worker
        that has not stopped after `signalAfterSeconds` is signalled by `escalateCancel`; use `cancelOverdue`
        and `kill` for one that does not stop at all."""
        if self._cancelRequestedAt is None:
            self._cancelRequestedAt = time.monotonic()
        try:
            (self.outputDirectory / CANCEL_FILE).touch()
        except OSError as error:
            logging.warning("Could not write the cancel file in %s: %s", self.outputDirectory, error)

    def escalateCancel(self, signalAfterSeconds: float) -> None:
        """Once a cancel is `signalAfterSeconds` old and the worker still runs: SIGTERM to its whole process
        group (POSIX), once. The group, not the process: PythonSlicer is a launcher that forwards no signal
        to the interpreter it starts; the engine answers SIGTERM by writing its partial result."""
        if (os.name == "nt" or self._cancelSignalled or self._cancelRequestedAt is None
                or self._process.poll() is not None or time.monotonic() - self._cancelRequestedAt < signalAfterSeconds):
            return
        self._cancelSignalled = True
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def _processGroupAlive(self) -> bool:
        if os.name == "nt":
            return False
        try:
            os.killpg(self._process.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def cancelOverdue(self, timeoutSeconds: float) -> bool:
        """True when a cancel was requested more than `timeoutSeconds` ago and the worker (or, behind a
        launcher, its process group) still runs."""
        return (self._cancelRequestedAt is not None and (self._process.poll() is None or self._processGroupAlive())
                and time.monotonic() - self._cancelRequestedAt > timeoutSeconds)

    def kill(self) -> None:
        """End the worker and every process it started, now, without waiting for them (this runs on the GUI
        thread): a background thread reaps the process; `finished` tells when its last events are in."""
        self._killProcessGroup()
        threading.Thread(target=self._process.wait, name="InferenceSpecificSeg worker reaper", daemon=True).start()

    def _killProcessGroup(self) -> None:
        if os.name == "nt":
            if self._process.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)],
                               capture_output=True, creationflags=subprocess.CREATE_NO_WINDOW)
            return
        try:
            # start_new_session made the worker the leader of a group whose id is its pid.
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group

    def logTail(self, lines: int = 15) -> str:
        """The last `lines` lines the worker wrote to stderr."""
        return readLogTail(self.logPath, lines)


def readLogTail(path: Path, lines: int) -> str:
    """The last `lines` lines of the text file `path` ("" when it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return "".join(deque(log, maxlen=lines)).strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class DeviceInfo:
    """What `isseg.cli devices` reports: whether a CUDA GPU is usable, its name and memory."""

    cuda: bool
    name: str
    memoryGiB: Optional[float]

    def describe(self, requested: str) -> str:
        """User-visible line saying which device a run with device setting `requested`
        ("auto", "cpu" or "cuda") will use."""
        gpu = _("{name} ({memory:.0f} GiB)").format(name=self.name, memory=self.memoryGiB) if self.memoryGiB else self.name
        if requested == "cpu":
            return _("Runs on the CPU (as selected).")
        if self.cuda:
            return _("Runs on the GPU: {gpu}.").format(gpu=gpu)
        if requested == "cuda":
            return _("No usable CUDA GPU was found: the run will fail. Select Automatic or CPU.")
        return _("Runs on the CPU (no CUDA GPU found); expect several minutes per run.")


class WorkerTask:
    """A short worker command (devices, phantom, a model install) running in the background, polled from a GUI
    timer: its events are collected as they arrive, and it is killed once it has run `timeoutSeconds`.

    `arguments` are those of `module`'s command line (the worker CLI's by default, e.g. ["devices"]); the task
    runs in a new private folder under `workDirectory` (`directory`), which receives its log (worker.log) and
    whatever it writes there.
    Raises WorkerError when the worker cannot be started."""

    def __init__(self, pythonExecutable: str, arguments: list, environment: dict, workDirectory=None,
                 timeoutSeconds: float = 120.0, module: str = WORKER_MODULE):
        self.directory = Path(tempfile.mkdtemp(prefix=f"InferenceSpecificSeg-{arguments[0]}-", dir=workDirectory))
        self.events: list = []
        self.timedOut = False
        self._deadline = time.monotonic() + timeoutSeconds
        try:
            self._worker = WorkerProcess(workerCommand(pythonExecutable, arguments, module), self.directory,
                                         self.directory / "worker.log", environment)
        except WorkerError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def poll(self) -> bool:
        """Take the new events; True once the worker has exited (never blocks)."""
        finished = self._worker.finished  # before taking the events: once finished, all are in the queue
        self.events.extend(self._worker.takeEvents())
        if not finished and not self.timedOut and time.monotonic() > self._deadline:
            self.timedOut = True
            self._worker.kill()
        return finished

    def lastEvent(self, kind: str) -> Optional[dict]:
        return next((event for event in reversed(self.events) if event["event"] == kind), None)

    def failureText(self) -> str:
        """Why the task gave no answer: the worker's error message, or its exit code and the end of its log."""
        error = self.lastEvent("error")
        if error is not None:
            return str(error.get("message") or error.get("kind"))
        if self.timedOut:
            return _("the worker did not answer in time. See its log: {log}").format(log=self._worker.logPath)
        return _("the worker stopped (exit code {code}). {log}").format(code=self._worker.returnCode,
                                                                     log=self._worker.logTail(5))

    def stop(self) -> None:
        """End the worker now (without waiting for it)."""
        self._worker.kill()


class WorkerTaskPoller:
    """Polls one WorkerTask at a time from `timer` (a QTimer of the panel, given so that this module needs no Qt)
    every `intervalMilliseconds`: calls `update(task)` (when given) after each poll while it runs, and
    `finished(task)` once it has exited."""

    def __init__(self, timer, finished, intervalMilliseconds: int, update=None):
        self.task: Optional[WorkerTask] = None
        self._finished = finished
        self._update = update
        self.timer = timer
        self.timer.setInterval(intervalMilliseconds)
        self.timer.connect("timeout()", self._poll)

    @property
    def busy(self) -> bool:
        return self.task is not None

    def start(self, task: WorkerTask) -> None:
        self.task = task
        self.timer.start()

    def stop(self) -> None:
        """Stop polling and end the task's worker (the module is being unloaded)."""
        self.timer.stop()
        if self.task is not None:
            self.task.stop()
            self.task = None

    def _poll(self) -> None:
        if self.task.poll():
            self.timer.stop()
            task, self.task = self.task, None
            self._finished(task)
        elif self._update is not None:
            self._update(self.task)


def deviceInfoFromTask(task: WorkerTask) -> DeviceInfo:
    """The answer of a finished `devices` task (started with WorkerTask(..., ["devices"], ...)); raises
    WorkerError with what went wrong when it gave none."""
    event = task.lastEvent("devices")
    if event is None:
        raise WorkerError(_("The worker did not report its devices: {reason}").format(reason=task.failureText()))
    memory = event.get("memory_gib")
    return DeviceInfo(bool(event.get("cuda")), str(event.get("name") or "CPU"),
                      float(memory) if isinstance(memory, (int, float)) else None)
