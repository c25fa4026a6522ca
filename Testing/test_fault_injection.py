"""Hostile and broken input (issue 11), each case run through the worker as a subprocess: the exit code,
the `error` (or `warning`) event, and what the output folder and the cache hold afterwards.
Tiny settings and small phantoms keep it fast; most cases fail before any work starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_support import parse_events, small_ct, worker_command, write_dicom_series
from isseg import archive, model_package, phantom
from isseg.errors import BadModelError
from isseg.networks.monai_net import build_monai_network
from isseg.output_folder import OutputFolder

TINY = ["--rounds", "1", "--steps", "2", "--update-every", "1", "--align-iterations", "2"]


def refine(input_path, output, *extra, model="demo", env=None, **popen):
    arguments = ["refine", "--input", str(input_path), "--model", str(model), "--output", str(output),
                 "--progress", "json", "--device", "cpu", *TINY, *extra]
    result = subprocess.run(worker_command(*arguments), capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})}, encoding="utf-8", **popen)
    return result, parse_events(result.stdout)


def check_failure(result, events, code: int, kind: str, text: str) -> dict:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}; stderr:\n{result.stderr[-1500:]}"
    assert events and events[-1]["event"] == "error", events[-3:]
    assert events[-1]["kind"] == kind and text in events[-1]["message"], events[-1]
    return events[-1]


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    case = phantom.generate(phantom.shifted_spec(3, size=(48, 48, 32), spacing=(4.0, 4.0, 4.0)))
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(case.image, str(path))
    return path


def copy_demo(demo_package, target: Path, edit=None) -> Path:
    shutil.copytree(demo_package, target)
    if edit:
        config = json.loads((target / "model.json").read_text(encoding="utf-8"))
        edit(config)
        (target / "model.json").write_text(json.dumps(config), encoding="utf-8")
    return target


# 1. Non-finite voxels.

def test_many_nan_voxels_are_refused_and_no_output_folder_is_made(tmp_path, ct):
    image = sitk.ReadImage(str(ct), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[:4] = np.nan
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(tmp_path / "nan.nrrd"))
    result, events = refine(tmp_path / "nan.nrrd", tmp_path / "out")
    check_failure(result, events, 3, "bad_input", "not numbers")
    assert not (tmp_path / "out").exists(), "a bad input must not leave an empty output folder"


def test_one_nan_voxel_is_air_with_a_warning_and_the_run_completes(tmp_path, ct):
    """Also: `~` in --output is expanded, and a `.write-test` link in the folder is never followed."""
    image = sitk.ReadImage(str(ct), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = np.nan
    damaged = sitk.GetImageFromArray(array)
    damaged.CopyInformation(image)
    sitk.WriteImage(damaged, str(tmp_path / "nan.nrrd"))
    output = tmp_path / "home" / "out"
    output.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    (output / ".write-test").symlink_to(victim)
    result, events = refine(tmp_path / "nan.nrrd", "~/out", env={"HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [e for e in events if e["event"] == "warning"]
    assert warnings and "not numbers" in warnings[0]["message"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "labelmap.nrrd")))
    assert len(set(np.unique(labels)) - {0}) >= 3, "the NaN voxel blanked the result"
    assert victim.read_text(encoding="utf-8") == "precious"
    assert not (Path.cwd() / "~").exists()
    assert json.loads((output / "report.json").read_text(encoding="utf-8"))["partial"] is False


# 2. One run per output folder.

def test_earlier_results_are_refused_without_overwrite_and_kept(tmp_path, ct):
    output = tmp_path / "out"
    output.mkdir()
    for name in ("report.json", "labelmap.nrrd", "snapshot_0002.nrrd"):
        (output / name).write_text(name, encoding="utf-8")
    result, events = refine(ct, output)
    check_failure(result, events, 7, "output_folder", "--overwrite")
    assert sorted(p.name for p in output.iterdir()) == ["labelmap.nrrd", "report.json", "snapshot_0002.nrrd"]
    assert (output / "report.json").read_text(encoding="utf-8") == "report.json"


def test_a_second_run_into_a_locked_folder_exits_7_naming_the_holder(tmp_path, ct):
    output = tmp_path / "out"
    with OutputFolder(output):
        result, events = refine(ct, output)
    error = check_failure(result, events, 7, "output_folder", "Another run")
    assert f"process {os.getpid()}" in error["message"]
    assert not (output / ".isseg-run.lock").exists(), "the lock file goes with the run that held it"


@pytest.mark.skipif(os.name == "nt", reason="SIGSTOP/SIGCONT are POSIX")
def test_two_real_runs_into_one_folder_the_second_exits_7_and_the_result_is_the_firsts(tmp_path, ct):
    """The first worker is stopped (SIGSTOP) while it holds the folder, so the second surely meets it; the
    second works on another (cropped) CT with other settings, so every result file tells whose it is."""
    output, cropped = tmp_path / "out", tmp_path / "cropped.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct))[:40], str(cropped))
    with open(tmp_path / "first.out", "w", encoding="utf-8") as stdout:
        first = subprocess.Popen(worker_command(
            "refine", "--input", str(ct), "--model", "demo", "--output", str(output), "--progress", "json",
            "--device", "cpu", "--seed", "11", *TINY), stdout=stdout, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while f'"pid": {first.pid},' not in _text_or_empty(output / ".isseg-run.lock"):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never locked the folder"
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)
        try:
            result, events = refine(cropped, output, "--seed", "22", "--steps", "3")
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=600) == 0
    finally:
        if first.poll() is None:
            first.kill()
    error = check_failure(result, events, 7, "output_folder", f"process {first.pid}")
    assert not [event for event in events if event["event"] == "snapshot"]
    first_events = parse_events((tmp_path / "first.out").read_text(encoding="utf-8"))
    assert first_events[-1]["event"] == "done", first_events[-3:]
    settings = json.loads((output / "settings.json").read_text(encoding="utf-8"))
    assert settings["seed"] == 11 and settings["refine"]["steps"] == 2 and settings["input"] == str(ct), error
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    snapshots = [event for event in first_events if event["event"] == "snapshot"]
    assert report["partial"] is False and report["snapshots"] == len(snapshots)
    assert sitk.ReadImage(str(output / "labelmap.nrrd")).GetSize() == sitk.ReadImage(str(ct)).GetSize()
    assert sorted(p.name for p in output.glob("snapshot_*")) == [Path(e["path"]).name for e in snapshots]
    assert not (output / ".isseg-run.lock").exists()


def _text_or_empty(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def test_overwrite_removes_report_first_and_a_killed_run_leaves_nothing_complete(tmp_path, ct):
    output = tmp_path / "out"
    output.mkdir()
    for name in ("report.json", "labelmap.nrrd", "snapshot_0009.nrrd"):
        (output / name).write_text("old", encoding="utf-8")
    (output / "notes.txt").write_text("mine", encoding="utf-8")
    process = subprocess.Popen(worker_command(
        "refine", "--input", str(ct), "--model", "demo", "--output", str(output), "--progress", "json",
        "--device", "cpu", "--overwrite", "--steps", "200", "--update-every", "100"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
    for line in process.stdout:
        if '"snapshot"' in line:
            process.kill()
            break
    process.wait(timeout=60)
    names = {p.name for p in output.iterdir()}
    assert "report.json" not in names and "labelmap.nrrd" not in names and "snapshot_0009.nrrd" not in names, names
    assert (output / "notes.txt").read_text(encoding="utf-8") == "mine", "files of the user are left alone"
    with OutputFolder(output, overwrite=True):  # the killed run's lock died with it
        pass


# Disk full: the output folder on a tiny tmpfs in a private mount namespace (root, or a user namespace).

DISK_FULL = r"""
size=$1 mount_point=$2 copy=$3; shift 3
mount -t tmpfs -o size="$size" tmpfs "$mount_point" || exit 90
mkdir "$mount_point/run" && printf mine > "$mount_point/run/notes.txt" || exit 91
"$@" --output "$mount_point/run"
code=$?
cp -a "$mount_point/run/." "$copy/" || exit 92
exit $code
"""


def private_mount_command() -> list[str]:
    """`unshare` with a private mount namespace (and a user namespace when not root), or a skip."""
    unshare = shutil.which("unshare")
    if os.name == "nt" or unshare is None:
        pytest.skip("disk-full test needs Linux `unshare` to mount a private tmpfs")
    command = [unshare, "-m"] if os.geteuid() == 0 else [unshare, "-r", "-m"]
    probe = subprocess.run([*command, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', "/mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here ({probe.stderr.strip()[:200]}): "
                    "needs root or unprivileged user namespaces")
    return command


def test_disk_full_exits_7_naming_it_and_leaves_no_temporary_file_and_nothing_complete(tmp_path, ct):
    namespace = private_mount_command()
    (tmp_path / "mnt").mkdir()
    (tmp_path / "copy").mkdir()
    # 20 KiB: the lock file, the user's file, segments.json and settings.json fit (a 4 KiB page each), the
    # first snapshot (two pages) does not: the run fails in a real stage, after the initial segmentation.
    worker = worker_command("refine", "--input", str(ct), "--model", "demo", "--progress", "json",
                            "--device", "cpu", *TINY)
    result = subprocess.run([*namespace, "sh", "-c", DISK_FULL, "sh", "20k", str(tmp_path / "mnt"),
                             str(tmp_path / "copy"), *worker], capture_output=True, text=True, timeout=600,
                            encoding="utf-8")
    assert result.returncode not in (90, 91, 92), result.stderr[-1500:]
    events = parse_events(result.stdout)
    error = check_failure(result, events, 7, "disk", "no space left on its disk")
    for snapshot in (event for event in events if event["event"] == "snapshot"):  # announced means intact
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "copy" / Path(snapshot["path"]).name)))
    assert "snapshot_0000.nrrd" in error["message"], error
    left = sorted(path.name for path in (tmp_path / "copy").iterdir())
    assert (tmp_path / "copy" / "notes.txt").read_text(encoding="utf-8") == "mine", "the user's file is untouched"
    assert not [name for name in left if name.startswith(".")], f"temporary or lock files left: {left}"
    assert left == ["notes.txt", "segments.json", "settings.json"], f"nothing that looks complete: {left}"


# 3. Zip packages.

def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive_file:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive_file.write(path, path.relative_to(folder).as_posix())
    return target


def declare_size(zip_path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size of `member` in the local and central headers (a lying zip)."""
    data = bytearray(zip_path.read_bytes())
    name = member.encode()
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            name_offset = start + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_offset:name_offset + len(name)] == name:
                data[start + offset:start + offset + 4] = struct.pack("<I", size)
            start += 4
    zip_path.write_bytes(bytes(data))


def test_zip_bomb_is_refused_and_leaves_the_cache_clean(tmp_path, ct, demo_package):
    bomb = zip_folder(demo_package, tmp_path / "bomb.zip")
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as archive_file:
        archive_file.writestr("atlas/padding.raw", b"\0" * 2**20)
    declare_size(bomb, "atlas/padding.raw", 2**31)
    cache = tmp_path / "cache"
    result, events = refine(ct, tmp_path / "out", model=bomb, env={"ISSEG_CACHE": str(cache)})
    check_failure(result, events, 4, "bad_model", "zip bomb")
    assert list((cache / "packages").iterdir()) == [], "nothing unpacked, no staging folder left"
    good = zip_folder(demo_package, tmp_path / "good.zip")  # and the cache still serves the next package
    assert (archive.unpack_cached(good, cache / "packages") / "model.json").is_file()
    assert not (tmp_path / "out").exists()


def test_zip_cache_is_rechecked_private_and_safe_under_concurrency(tmp_path, demo_package):
    package_zip = zip_folder(demo_package, tmp_path / "demo.zip")
    cache = tmp_path / "cache"
    script = "import sys; from isseg import archive; print(archive.unpack_cached(sys.argv[1], sys.argv[2]))"
    processes = [subprocess.Popen([*worker_command()[:1], "-c", script, str(package_zip), str(cache)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0))
                 for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    entries = {out.strip() for out, _ in outputs}
    assert len(entries) == 1 and [p.name for p in cache.iterdir()] == [Path(entries.pop()).name]
    for path in [cache, *cache.rglob("*")]:
        assert not path.stat().st_mode & 0o002, f"{path} is world-writable"
    entry = next(cache.iterdir())
    (entry / "model.json").write_text("{}", encoding="utf-8")  # an edited cache entry is not trusted
    assert archive.unpack_cached(package_zip, cache) == entry
    assert json.loads((entry / "model.json").read_text(encoding="utf-8"))["name"]


# 4. Links in the output folder.

def test_lock_file_link_is_never_followed(tmp_path, ct):
    output = tmp_path / "out"
    output.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    (output / ".isseg-run.lock").symlink_to(victim)
    result, events = refine(ct, output)
    check_failure(result, events, 7, "disk", "Cannot write to the output folder")
    assert victim.read_text(encoding="utf-8") == "precious"


# 5. Memory limits, checked before the run.

# Headroom over the worker's address space once it has imported everything: enough to read a 192 x 192 x 128
# input and the package and to predict (about 190 MiB measured), not enough to put the initial class
# probabilities on that input grid for the first snapshot (about 440 MiB).
MEMORY_HEADROOM = 300 * 2**20
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # no per-thread stacks and arenas to blur it


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RLIMIT_AS and /proc/self/status are Linux")
def test_main_memory_running_out_in_a_stage_exits_5_naming_it(tmp_path, ct):
    import resource

    image = sitk.ReadImage(str(ct))
    fine = sitk.Resample(image, [4 * size for size in image.GetSize()], sitk.Transform(), sitk.sitkLinear,
                         image.GetOrigin(), (1.0, 1.0, 1.0), image.GetDirection(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(fine, str(tmp_path / "fine.nrrd"), True)
    probe = subprocess.run([*worker_command()[:1], "-c", "import re; from isseg import cli; "
                            "print(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"],
                           capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, check=True)
    limit = int(probe.stdout) * 1024 + MEMORY_HEADROOM
    result, events = refine(tmp_path / "fine.nrrd", tmp_path / "out", env=ONE_THREAD,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    error = check_failure(result, events, 5, "out_of_memory", "during the initial stage")
    assert "allocate" in error["message"], "the message says which allocation failed"
    left = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert "report.json" not in left and not [name for name in left if name.startswith(".")], left


def test_onednn_failing_for_memory_counts_as_out_of_memory(tmp_path, monkeypatch):
    """Near the limit of the test above, oneDNN's convolution sometimes fails first, saying only that it
    could not create a primitive (its workspace allocation failed): exit 5 too, not an internal error."""
    import io

    from isseg.errors import OutOfMemoryError
    from isseg.events import EventWriter
    from isseg.pipeline import Run
    from isseg.refinement import RefineSettings

    def fail(self):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(Run, "_load_and_check", fail)
    run = Run(tmp_path / "ct.nrrd", tmp_path / "package", tmp_path / "out", RefineSettings(),
              EventWriter(io.StringIO()), device=None, seed=0)
    with pytest.raises(OutOfMemoryError, match="during the initial stage .could not create a primitive"):
        run.execute()


def test_huge_network_is_refused_with_exit_4_before_allocating(tmp_path, ct, demo_package):
    def huge(config):
        config["network"]["args"]["channels"] = [4096, 8192, 16384, 32768]

    model = copy_demo(demo_package, tmp_path / "model", huge)
    result, events = refine(ct, tmp_path / "out", model=model)
    check_failure(result, events, 4, "bad_model", "parameters")
    assert not (tmp_path / "out").exists()


def test_too_fine_spacing_and_huge_patch_are_refused(tmp_path, ct, demo_package):
    from isseg.errors import BadInputError
    from isseg.input_checks import check_model_grid

    with pytest.raises(BadModelError, match="too fine"):
        check_model_grid(sitk.ReadImage(str(ct)), (0.01, 0.01, 0.01), "LPS", 7)
    with pytest.raises(BadInputError, match="covers only"):
        check_model_grid(small_ct(spacing=(0.1, 0.1, 0.1)), (4.0, 4.0, 4.0), "LPS", 7)
    # A thin partial scan runs (test_refine_cli); only a grid the alignment cannot work on is refused.
    thin = small_ct(size_xyz=(20, 16, 3), spacing=(4.0, 4.0, 4.0))
    assert check_model_grid(thin, (4.0, 4.0, 4.0), "LPS", 7) == (20, 16, 3)
    with pytest.raises(BadInputError, match="20 x 16 x 2 voxels, and the model needs at least 3 along every axis"):
        check_model_grid(thin[:, :, :2], (4.0, 4.0, 4.0), "LPS", 7)
    model = copy_demo(demo_package, tmp_path / "model", lambda c: c.update(patch_size=[1024, 1024, 1024]))
    package = model_package.load(model, check_atlas=False)
    from isseg import package_checks

    with pytest.raises(BadModelError, match="needs at least"):
        package_checks.check_footprint(lambda: build_monai_network(package.config["network"]),
                                       (1024, 1024, 1024), 2, 1, model / "model.json")


# 6. DICOM gaps.

def test_dicom_series_with_a_missing_slice_is_refused_naming_it(tmp_path):
    write_dicom_series(small_ct(size_xyz=(20, 16, 10), spacing=(1.0, 1.0, 4.0)), tmp_path / "series")
    (tmp_path / "series" / "slice_004.dcm").unlink()
    result, events = refine(tmp_path / "series", tmp_path / "out")
    check_failure(result, events, 3, "bad_input", "no slice at")
    assert "--allow-slice-gaps" in events[-1]["message"]

    from isseg.dicom_series import read_series

    image, filled = read_series(tmp_path / "series", allow_gaps=True)
    assert image.GetSize()[2] == 10 and len(filled) == 1
    np.testing.assert_allclose(image.GetSpacing()[2], 4.0, atol=1e-4)


# 7, 8, 9. Inconsistent, escaping and downloading packages.

PACKAGE_FAULTS = {
    "label_without_name": (lambda c: c["labels"][0].pop("name"), "has no name"),
    "missing_intensity": (lambda c: c["input"].pop("intensity"), "input.intensity"),
    "absolute_weights": (lambda c: c.update(weights="/etc/passwd"), "relative to the package"),
    "escaping_atlas": (lambda c: c.update(atlas="../../../etc/passwd"), "outside the package"),
    "pretrained": (lambda c: c["network"]["args"].update(pretrained=True), "download"),
    "url_argument": (lambda c: c["network"]["args"].update(act="https://example.org/act.pt"), "never downloads"),
    "absolute_atlas_elsewhere": (lambda c: c.update(atlas=str(Path.home() / "other" / "atlas" / "manifest.json")),
                                 "relative to the package"),
}
BUILD_FAULTS = ("pretrained", "url_argument")  # refused when the network is built


@pytest.mark.parametrize("fault", sorted(PACKAGE_FAULTS))
def test_inconsistent_package_is_refused_with_exit_4_before_the_run(tmp_path, ct, demo_package, fault):
    edit, text = PACKAGE_FAULTS[fault]
    model = copy_demo(demo_package, tmp_path / "model", edit)
    if fault in BUILD_FAULTS:
        with pytest.raises(BadModelError, match=text):
            model_package.load(model).build_network()
        return
    with pytest.raises(BadModelError, match=text):
        model_package.load(model)
    if fault == "label_without_name":  # one of them through the worker: exit 4, nothing written
        result, events = refine(ct, tmp_path / "out", model=model)
        check_failure(result, events, 4, "bad_model", text)
        assert not (tmp_path / "out").exists()


def test_atlas_label_value_the_model_lacks_is_refused(tmp_path, demo_package):
    model = copy_demo(demo_package, tmp_path / "model")
    manifest = json.loads((model / "atlas" / "manifest.json").read_text(encoding="utf-8"))
    entry = manifest["cases"][0]
    labels = sitk.ReadImage(str(model / "atlas" / entry["label"]))
    array = sitk.GetArrayFromImage(labels)
    array[0, 0, 0] = 9
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(labels)
    sitk.WriteImage(changed, str(model / "atlas" / entry["label"]), True)
    entry["sha256"]["label"] = model_package.sha256(model / "atlas" / entry["label"])
    (model / "atlas" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BadModelError, match=r"label values \[9\]"):
        model_package.load(model)


def test_unreadable_atlas_image_is_refused_with_exit_4_before_the_run(tmp_path, ct, demo_package):
    model = copy_demo(demo_package, tmp_path / "model")
    manifest = json.loads((model / "atlas" / "manifest.json").read_text(encoding="utf-8"))
    entry = manifest["cases"][0]
    (model / "atlas" / entry["image"]).write_bytes(b"not an image" * 10)
    entry["sha256"]["image"] = model_package.sha256(model / "atlas" / entry["image"])  # intact by its checksum
    (model / "atlas" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    result, events = refine(ct, tmp_path / "out", model=model)
    check_failure(result, events, 4, "bad_model", "cannot be read")
    assert not (tmp_path / "out").exists()


# 10. Option values and signals.

@pytest.mark.parametrize("option", [["--steps", "0"], ["--update-every", "0"], ["--momentum", "1"],
                                    ["--align-iterations", "-3"], ["--rounds", "7"]])
def test_bad_option_value_exits_2_with_an_error_event(tmp_path, ct, option):
    result, events = refine(ct, tmp_path / "out", *option)
    check_failure(result, events, 2, "usage", option[0])
    assert not (tmp_path / "out").exists()


def test_sigterm_in_the_first_second_exits_6_with_an_event(tmp_path, ct):
    process = subprocess.Popen(worker_command("refine", "--input", str(ct), "--model", "demo", "--output",
                                              str(tmp_path / "out"), "--progress", "json", "--device", "cpu"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
    time.sleep(0.5)
    process.terminate()
    stdout, _ = process.communicate(timeout=120)
    events = parse_events(stdout)
    assert process.returncode == 6, (process.returncode, stdout)
    assert events and events[-1]["event"] == "cancelled"


def test_slicer_side_counts_a_result_complete_only_by_its_report(tmp_path):
    from InferenceSpecificSegLib.protocol import resultIsComplete

    (tmp_path / "labelmap.nrrd").write_text("looks finished", encoding="utf-8")
    assert not resultIsComplete(tmp_path), "a labelmap without report.json is not a complete result"
    (tmp_path / "report.json").write_text(json.dumps({"partial": True}), encoding="utf-8")
    assert not resultIsComplete(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"partial": False}), encoding="utf-8")
    assert resultIsComplete(tmp_path)


# The contract: the exit codes and error kinds documented are the ones the worker uses.

def test_documented_exit_codes_and_error_kinds_match_the_protocol():
    from isseg import errors, protocol
    from isseg.commands.refine import EXIT_CODES_HELP

    root = Path(__file__).resolve().parents[1]
    codes = {value: name for name, value in vars(protocol).items() if name.startswith("EXIT_")}
    assert sorted(codes) == list(range(len(codes))), codes
    text = (root / "docs" / "worker-protocol.md").read_text(encoding="utf-8")
    table = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = [int(row.split("|")[1]) for row in table.splitlines() if row.startswith("| ") and row[2].isdigit()]
    assert documented == sorted(codes), f"docs/worker-protocol.md lists {documented}, isseg.protocol {sorted(codes)}"
    helped = [int(line.split()[0]) for line in EXIT_CODES_HELP.splitlines()[1:] if line.strip()]
    assert helped == sorted(codes), "isseg refine --help lists other exit codes"
    readme = (root / "README.md").read_text(encoding="utf-8")
    for code in codes:
        assert f"{code} " in readme.split("exit code says what went wrong:", 1)[1][:400], f"README lacks exit {code}"
    kinds = {error.kind for error in vars(errors).values()
             if isinstance(error, type) and issubclass(error, errors.IssegError)} | {"usage"}
    event_row = next(row for row in text.splitlines() if row.startswith("| `error` |"))
    assert set(re.findall(r"`(\w+)`", event_row.split("`kind`", 1)[1].split(")", 1)[0])) == kinds
    for error in vars(errors).values():
        if isinstance(error, type) and issubclass(error, errors.IssegError):
            assert error.exit_code in codes, error
