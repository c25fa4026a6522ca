"""RefinementLogic end to end: a real MRML scene (slicer-core), a real worker subprocess, poll() as the
GUI timer calls it. Most tests use a stand-in CLI that follows the protocol; the last one runs the engine."""

import os
import sys
import time

import numpy as np
import pytest

from slicer_test_support import (addPhantomVolume, addVolume, newScene, pollUntil, processAlive, processGroupMembers,
                                 segmentIds, writeFakeEngine)

from InferenceSpecificSegLib.logic import RefinementLogic, RunState
from InferenceSpecificSegLib.settings import Device, RunSettings

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")


@pytest.fixture
def scene():
    return newScene()


@pytest.fixture
def volumeNode(scene):
    return addVolume(scene, np.full((10, 12, 14), -500, np.int16), spacing=(1.5, 1.5, 3.0), name="CT")


@pytest.fixture
def fakeLogic(scene, tmp_path):
    logic = RefinementLogic(scene, sys.executable, moduleDirectory=writeFakeEngine(tmp_path), workDirectory=tmp_path,
                            cancelTimeoutSeconds=1.0)
    yield logic
    logic.stopNow()


def test_run_updates_one_node_live_and_ends_with_the_final_result(fakeLogic, volumeNode, scene):
    status = fakeLogic.start(volumeNode, "fake-slow", RunSettings(steps=6))
    assert status.state == RunState.RUNNING and status.segmentationNode is None
    runDirectory = fakeLogic.runDirectory
    nodesSeen, messagesSeen = set(), set()

    def observe(status):
        if status.segmentationNode is not None:
            nodesSeen.add(status.segmentationNode.GetID())
        messagesSeen.add(status.message)
        return not status.active

    status = pollUntil(fakeLogic, observe)
    assert status.state == RunState.DONE, status.message
    assert status.resultsLoaded >= 2
    assert len(nodesSeen) == 1 and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert any(message.startswith("Refining: ") and "left" in message for message in messagesSeen)
    node = status.segmentationNode
    assert node.GetName() == "CT ISL"
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in segmentIds(node)] == ["liver", "spleen"]
    assert "Done" in status.message and "CT ISL" in status.message
    assert not runDirectory.exists()  # the private run folder is removed after success


def test_cancel_keeps_the_last_result_marked_partial(fakeLogic, volumeNode):
    fakeLogic.start(volumeNode, "fake-slow", RunSettings(steps=500))
    pollUntil(fakeLogic, lambda status: status.resultsLoaded >= 1)
    workerPid = fakeLogic.workerProcessId
    fakeLogic.cancel()
    assert fakeLogic.status.state == RunState.CANCELLING
    status = pollUntil(fakeLogic, lambda status: not status.active)
    assert status.state == RunState.CANCELLED
    assert status.segmentationNode.GetName() == "CT ISL (partial)"
    assert "CT ISL (partial)" in status.message
    assert processGroupMembers(workerPid) == []
    assert (fakeLogic.runDirectory / "worker.log").exists()  # kept for inspection


def test_worker_error_is_reported_with_its_message(fakeLogic, volumeNode):
    fakeLogic.start(volumeNode, "fake-bad-model", RunSettings(steps=5))
    status = pollUntil(fakeLogic, lambda status: not status.active)
    assert status.state == RunState.FAILED
    assert status.errorMessage == "The model package is damaged. Copy it again."
    assert status.segmentationNode is None


def test_a_crashed_worker_is_reported_with_its_exit_code_and_log(fakeLogic, volumeNode):
    fakeLogic.start(volumeNode, "fake-crash", RunSettings(steps=5))
    status = pollUntil(fakeLogic, lambda status: not status.active)
    assert status.state == RunState.FAILED
    assert "exit code 1" in status.errorMessage and "boom in the fake worker" in status.errorMessage


def test_a_final_result_that_cannot_be_read_fails_the_run_and_keeps_the_preview(fakeLogic, volumeNode):
    fakeLogic.start(volumeNode, "fake-unreadable-result", RunSettings(steps=4))
    status = pollUntil(fakeLogic, lambda status: not status.active)
    assert status.state == RunState.FAILED
    assert "could not be loaded" in status.errorMessage and "worker.log" in status.errorMessage
    assert status.segmentationNode.GetName() == "CT ISL (partial)"


def test_done_without_report_is_not_called_complete(fakeLogic, volumeNode, scene):
    """The completeness rule (docs/worker-protocol.md): a `done` event and a readable labelmap without
    report.json is no complete result; the panel says so and keeps the labelmap as a partial one."""
    fakeLogic.start(volumeNode, "fake-no-report", RunSettings(steps=4))
    runDirectory = fakeLogic.runDirectory
    status = pollUntil(fakeLogic, lambda status: not status.active)
    assert (runDirectory / "output" / "labelmap.nrrd").exists()
    assert not (runDirectory / "output" / "report.json").exists()
    assert status.state == RunState.FAILED, status.message
    assert "report.json" in status.errorMessage and "worker.log" in status.errorMessage
    assert status.message.startswith("Failed: ") and "Done" not in status.message
    assert status.segmentationNode.GetName() == "CT ISL (partial)"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert runDirectory.exists(), "the run folder is kept after a failure, for its log"


def test_a_worker_that_ignores_cancel_is_killed_and_leaves_no_process(fakeLogic, volumeNode):
    fakeLogic.start(volumeNode, "fake-stubborn", RunSettings(steps=5))
    pollUntil(fakeLogic, lambda status: status.resultsLoaded >= 1)
    childPid = int((fakeLogic.runDirectory / "output" / "child.pid").read_text(encoding="utf-8"))
    workerPid = fakeLogic.workerProcessId
    fakeLogic.cancel()
    status = pollUntil(fakeLogic, lambda status: not status.active, seconds=30)
    assert status.state == RunState.CANCELLED
    assert status.segmentationNode.GetName() == "CT ISL (partial)"
    assert not processAlive(workerPid) and not processAlive(childPid)
    assert processGroupMembers(workerPid) == []


def test_one_run_at_a_time(fakeLogic, volumeNode):
    fakeLogic.start(volumeNode, "fake-slow", RunSettings(steps=500))
    with pytest.raises(RuntimeError, match="already going"):
        fakeLogic.start(volumeNode, "fake", RunSettings(steps=5))


def test_real_worker_on_a_tiny_phantom_publishes_snapshots_and_cancels(scene, tmp_path):
    """Needs the engine (isseg.cli): `python -m isseg.cli refine --input IN --model demo --output DIR --steps 20
    --device cpu`, started by the logic exactly as in Slicer."""
    volumeNode = addPhantomVolume(scene, tmp_path, (48, 48, 32), (6.0, 6.0, 6.0))

    logic = RefinementLogic(scene, sys.executable, workDirectory=tmp_path, cancelTimeoutSeconds=30.0)
    try:
        logic.start(volumeNode, "demo", RunSettings(steps=20, device=Device.CPU))
        workerPid = logic.workerProcessId
        status = pollUntil(logic, lambda status: status.resultsLoaded >= 1 or not status.active, seconds=600)
        assert status.resultsLoaded >= 1, f"no snapshot arrived: {status.message}\n{status.errorMessage}"
        node = status.segmentationNode
        assert node.GetSegmentation().GetNumberOfSegments() == len(logic.segments) > 0
        logic.cancel()
        status = pollUntil(logic, lambda status: not status.active, seconds=120)
    finally:
        logic.stopNow()
    assert status.state in (RunState.CANCELLED, RunState.DONE), status.message
    assert status.resultsLoaded >= 2  # the initial snapshot, then the partial (or final) result
    if status.state == RunState.CANCELLED:
        assert status.segmentationNode.GetName() == "Phantom ISL (partial)"
    assert status.segmentationNode is node
    assert processGroupMembers(workerPid) == []


def test_stop_now_returns_at_once_even_when_the_worker_pipe_stays_open(fakeLogic, volumeNode, tmp_path):
    """stopNow runs on the GUI thread (scene close, exit): it must not wait for the worker's pipe, which a
    process outside the worker's process group (here the fake's orphan) can hold open."""
    fakeLogic.start(volumeNode, "fake-orphan", RunSettings(steps=500))
    workerPid, orphanPidFile = fakeLogic.workerProcessId, fakeLogic.runDirectory / "output" / "orphan.pid"
    pollUntil(fakeLogic, lambda status: status.resultsLoaded >= 1)
    orphanPid = int(orphanPidFile.read_text(encoding="utf-8"))
    try:
        started = time.monotonic()
        fakeLogic.stopNow()
        assert time.monotonic() - started < 1.0
        assert fakeLogic.status.state == RunState.CANCELLED and not fakeLogic.status.active
        deadline = time.monotonic() + 5
        while processGroupMembers(workerPid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processGroupMembers(workerPid) == []
    finally:
        os.kill(orphanPid, 9)
