"""The worker process as the Slicer logic sees it: real subprocesses (a stand-in CLI that follows the
protocol), events through the reader thread, cancelling, killing the process tree."""

import os
import sys
import time

import numpy as np
import pytest

from slicer_test_support import addVolume, newScene, processAlive, processGroupMembers, writeFakeEngine, writeVolumeFile

from InferenceSpecificSegLib.protocol import CANCEL_FILE
from InferenceSpecificSegLib.worker import (DeviceInfo, WorkerError, WorkerProcess, WorkerTask, deviceInfoFromTask, workerCommand,
                                            workerEnvironment)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")


@pytest.fixture
def engine(tmp_path):
    """(fake engine folder, input CT file, output folder)."""
    inputPath = tmp_path / "input.nrrd"
    writeVolumeFile(addVolume(newScene(), np.zeros((6, 8, 10), np.int16)), inputPath)
    output = tmp_path / "output"
    output.mkdir()
    return writeFakeEngine(tmp_path), inputPath, output


def startWorker(engine, model, steps=6):
    moduleDirectory, inputPath, output = engine
    command = workerCommand(sys.executable, ["refine", "--input", inputPath, "--model", model, "--output", output,
                                             "--steps", steps])
    return WorkerProcess(command, output, output.parent / "worker.log", workerEnvironment(moduleDirectory))


def waitUntil(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def collectUntilFinished(worker, seconds=60.0):
    events = []
    waitUntil(lambda: events.extend(worker.takeEvents()) or worker.finished, seconds)
    return events + worker.takeEvents()


def test_environment_puts_the_module_folder_first():
    environment = workerEnvironment("/opt/module", {"PYTHONPATH": "/a" + os.pathsep + "/b", "HOME": "/home/x"})
    assert environment["PYTHONPATH"].split(os.pathsep) == ["/opt/module", "/a", "/b"]
    assert environment["PYTHONUNBUFFERED"] == "1" and environment["HOME"] == "/home/x"
    assert workerCommand("/usr/bin/python3", ["refine", 3]) == ["/usr/bin/python3", "-m", "isseg.cli", "refine", "3"]


def test_events_arrive_in_order_and_noise_is_dropped(engine):
    worker = startWorker(engine, "fake")
    events = collectUntilFinished(worker)
    kinds = [event["event"] for event in events]
    assert kinds[:2] == ["stage", "snapshot"] and kinds[-1] == "done"
    assert kinds.count("progress") == 6 and kinds.count("snapshot") == 4
    assert all(isinstance(event, dict) for event in events)  # "noise" and "{half a json" were dropped
    assert worker.returnCode == 0
    assert "fake worker starting" in worker.logTail()


def test_a_worker_dying_mid_line_gives_its_exit_code_and_log(engine):
    worker = startWorker(engine, "fake-crash")
    assert collectUntilFinished(worker) == []
    assert worker.returnCode == 1
    assert "boom in the fake worker" in worker.logTail()


def test_cancel_lets_the_worker_write_its_partial_result(engine):
    worker = startWorker(engine, "fake-slow", steps=200)
    waitUntil(lambda: (engine[2] / "snapshot_0000.nrrd").exists())
    worker.requestCancel()
    events = collectUntilFinished(worker)
    assert (engine[2] / CANCEL_FILE).exists()
    assert events[-1]["event"] == "cancelled" and events[-1]["partial"] is True
    assert worker.returnCode == 6
    assert processGroupMembers(worker.pid) == []


def test_a_worker_that_ignores_cancel_is_killed_with_its_children(engine):
    worker = startWorker(engine, "fake-stubborn")
    childPidFile = engine[2] / "child.pid"
    waitUntil(childPidFile.exists)
    childPid = int(childPidFile.read_text(encoding="utf-8"))
    assert processAlive(childPid)
    worker.requestCancel()
    time.sleep(1.0)
    assert not worker.finished and worker.cancelOverdue(0.5)
    worker.kill()
    waitUntil(lambda: worker.finished, 10)
    assert not processAlive(worker.pid) and not processAlive(childPid)
    assert processGroupMembers(worker.pid) == []


def test_devices_are_read_from_the_worker_in_the_background(engine, tmp_path):
    task = WorkerTask(sys.executable, ["devices"], workerEnvironment(engine[0]), tmp_path)
    waitUntil(task.poll, 30)
    info = deviceInfoFromTask(task)
    assert info == DeviceInfo(cuda=False, name="CPU", memoryGiB=None)
    assert "CPU" in info.describe("auto")
    gpu = DeviceInfo(cuda=True, name="NVIDIA H100", memoryGiB=79.6)
    assert "NVIDIA H100 (80 GiB)" in gpu.describe("auto") and "CPU" in gpu.describe("cpu")
    assert "No usable CUDA GPU" in info.describe("cuda")


def startThroughLauncher(engine, tmp_path, model):
    from slicer_test_support import writeLauncher

    moduleDirectory, inputPath, output = engine
    command = [sys.executable, str(writeLauncher(tmp_path)), "-m", "isseg.cli", "refine", "--input", str(inputPath),
               "--model", model, "--output", str(output), "--steps", "500"]
    return WorkerProcess(command, output, output.parent / "worker.log", workerEnvironment(moduleDirectory))


def cancelAsThePanelDoes(worker, signalAfterSeconds=1.0, timeoutSeconds=20.0):
    """What RefinementLogic.poll does after a cancel: escalate to SIGTERM, kill when overdue."""
    worker.requestCancel()
    events = []

    def step():
        events.extend(worker.takeEvents())
        worker.escalateCancel(signalAfterSeconds)
        if worker.cancelOverdue(timeoutSeconds):
            worker.kill()
        return worker.finished

    waitUntil(step, 60)
    return events + worker.takeEvents()


def test_cancel_through_a_launcher_reaches_the_interpreter_by_the_cancel_file(engine, tmp_path):
    worker = startThroughLauncher(engine, tmp_path, "fake-slow")
    waitUntil(lambda: (engine[2] / "snapshot_0000.nrrd").exists())
    events = cancelAsThePanelDoes(worker)
    assert events[-1]["event"] == "cancelled" and (engine[2] / "labelmap.nrrd").exists()
    assert worker.returnCode == 6  # the launcher passed on the interpreter's exit code: nothing was killed
    assert processGroupMembers(worker.pid) == []


def test_cancel_through_a_launcher_signals_the_whole_process_group(engine, tmp_path):
    """The interpreter does not look at the cancel file (busy): SIGTERM must reach it, not just the launcher."""
    worker = startThroughLauncher(engine, tmp_path, "fake-deaf")
    waitUntil(lambda: (engine[2] / "snapshot_0000.nrrd").exists())
    events = cancelAsThePanelDoes(worker)
    assert events and events[-1]["event"] == "cancelled" and events[-1]["partial"] is True
    assert (engine[2] / "labelmap.nrrd").exists()  # the partial result was written before anything was killed
    assert processGroupMembers(worker.pid) == []


def test_a_device_query_that_does_not_answer_in_time_is_killed(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DEVICES_SECONDS", "60")
    task = WorkerTask(sys.executable, ["devices"], workerEnvironment(engine[0]), tmp_path, timeoutSeconds=0.5)
    assert not task.poll()  # answers at once, whatever the worker does
    waitUntil(task.poll, 10)
    assert task.timedOut
    with pytest.raises(WorkerError, match="did not answer in time"):
        deviceInfoFromTask(task)
