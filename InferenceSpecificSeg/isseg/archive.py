"""Safe unpacking of zipped model packages, shared by the worker and the Slicer panel.

Standard library only (no torch, no numpy), so that the Slicer side may import it as it imports
`isseg.protocol`. A zip is checked before anything is written, and refused with ArchiveError when
- a member's path is absolute, has a drive letter, climbs out with `..`, repeats an earlier name, or
  is a link;
- it holds more than MAX_FILES files, or unpacks to more than MAX_UNPACKED_BYTES;
- it unpacks to more than BOMB_MIN_BYTES at more than MAX_RATIO times its compressed size (a zip bomb:
  model weights and compressed images shrink by a few times at most);
- it does not fit on the disk (ArchiveSpaceError).
Members are streamed to files created exclusively (never through a link, never world-writable,
whatever the umask); each stops at the size its entry declares and has its CRC checked.

`unpack_cached` keeps one unpacked copy per zip in a cache folder named by the zip's SHA-256. It
unpacks into a private staging folder and renames it into place, so a reader never sees half a
package and two processes unpacking the same zip at once both end up with the same complete copy.
Every file's checksum is recorded in the entry and re-checked each time it is used: an entry that was
edited or damaged is replaced by a fresh unpack.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

MAX_FILES = 20_000
MAX_UNPACKED_BYTES = 16 * 2**30
MAX_RATIO = 100
BOMB_MIN_BYTES = 2**30
DISK_MARGIN_BYTES = 256 * 2**20  # left free on the disk after unpacking
RECORD_FILE = ".isseg-unpacked.json"  # per-file checksums of a cache entry
STAGING_PREFIX = ".staging-"
DISCARDED_PREFIX = ".discarded-"


class ArchiveError(ValueError):
    """The zip is unsafe, damaged or too large; the message names the zip, the reason and what to do."""


class ArchiveSpaceError(ArchiveError):
    """The zip is fine but does not fit on the disk that holds the target folder."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shallowest_folder_with(folder: Path, file_name: str) -> Path:
    """The folder holding `file_name`: `folder` itself or, for a zip of a folder, the shallowest one below
    (a package zipped with its enclosing folder unpacks one level down)."""
    candidates = sorted(folder.rglob(file_name), key=lambda path: len(path.parts))
    return candidates[0].parent if candidates else folder


def member_path(name: str) -> PurePosixPath | None:
    """The relative path a zip member may be written to, None for a directory entry; ArchiveError when
    the name is absolute, has a drive letter or climbs out of the target with `..`."""
    normalised = name.replace("\\", "/")
    path = PurePosixPath(normalised)
    if (normalised.startswith("/") or (path.parts and ":" in path.parts[0])
            or any(part == ".." for part in path.parts)):
        raise ArchiveError(f"it holds the unsafe path '{name}'")
    if normalised.endswith("/") or not path.parts:
        return None
    return path


def checked_members(archive: zipfile.ZipFile, archive_bytes: int) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """(member, relative path) of every file in `archive`, after all the checks of the module docstring
    except the disk space; raises ArchiveError naming the first problem."""
    members, seen, total = [], set(), 0
    for info in archive.infolist():
        path = member_path(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"it holds the link '{info.filename}'; packages hold plain files only")
        if path is None:
            continue
        key = path.as_posix().lower()
        if key in seen:
            raise ArchiveError(f"it holds '{info.filename}' twice")
        seen.add(key)
        members.append((info, path))
        total += info.file_size
    if len(members) > MAX_FILES:
        raise ArchiveError(f"it holds {len(members)} files, more than the {MAX_FILES} a model package may have")
    if total > MAX_UNPACKED_BYTES:
        raise ArchiveError(f"it unpacks to {_gib(total)}, more than the {_gib(MAX_UNPACKED_BYTES)} a model package may take")
    if total > BOMB_MIN_BYTES and total > MAX_RATIO * max(archive_bytes, 1):
        raise ArchiveError(f"it unpacks to {_gib(total)} from {_gib(archive_bytes)} ({total // max(archive_bytes, 1)} times "
                           f"its size, more than {MAX_RATIO}): it looks like a zip bomb")
    return members


def unpacked_size(members) -> int:
    return sum(info.file_size for info, _ in members)


def extract(zip_path: str | os.PathLike, target: str | os.PathLike, progress=None) -> dict[str, str]:
    """Unpack `zip_path` into the new folder `target` (its parent must exist; `target` must not).

    Returns {relative path: SHA-256} of the files written. Raises ArchiveError (ArchiveSpaceError when
    it does not fit on the disk); `target` may then hold part of the files: unpack into a staging
    folder (as `unpack_cached` does) and remove it on failure. `progress(bytes_written, bytes_in_all)`,
    when given, is called after each file.
    """
    zip_path, target = Path(zip_path), Path(target)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = checked_members(archive, zip_path.stat().st_size)
            total = unpacked_size(members)
            _require_space(target.parent, total)
            target.mkdir(mode=0o755)
            written, digests = 0, {}
            for info, path in members:
                digests[path.as_posix()] = _write_member(archive, info, target, path)
                written += info.file_size
                if progress is not None:
                    progress(written, total)
            return digests
    except ArchiveError as error:
        raise type(error)(f"'{zip_path}' cannot be unpacked: {error}.") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise ArchiveError(f"'{zip_path}' is damaged or uses an unsupported compression ({error}). "
                           "Download or copy the package again.") from None


def _require_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN_BYTES > free:
        raise ArchiveSpaceError(f"it unpacks to {_gib(needed)} but only {_gib(free)} are free in '{folder}'; "
                                "free disk space (or set ISSEG_CACHE to a folder on a larger disk)")


def _write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, path: PurePosixPath) -> str:
    """Stream one member to a file created exclusively under `target`; returns its SHA-256."""
    destination = target.joinpath(*path.parts)
    for folder in reversed(destination.parents):
        if len(folder.parts) > len(target.parts) and not folder.is_dir():
            folder.mkdir(mode=0o755)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    digest = hashlib.sha256()
    try:
        # zipfile stops each member at the size its entry declares and checks its CRC at the end.
        with archive.open(info) as source, os.fdopen(os.open(destination, flags, 0o644), "wb") as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
    except OSError as error:
        raise ArchiveSpaceError(f"writing '{destination}' failed ({error.strerror})") from None
    return digest.hexdigest()


def unpack_cached(zip_path: str | os.PathLike, cache_folder: str | os.PathLike) -> Path:
    """The folder, under `cache_folder`, that holds the verified unpacked copy of `zip_path`.

    The entry is named by the zip's SHA-256 and re-checked file by file against the checksums recorded
    when it was unpacked; a missing, damaged or edited entry is (re)unpacked. Raises ArchiveError.
    """
    zip_path, cache_folder = Path(zip_path), Path(cache_folder)
    cache_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_abandoned(cache_folder)
    zip_sha256 = sha256_file(zip_path)
    entry = cache_folder / zip_sha256
    if entry.is_dir():
        if _entry_is_intact(entry, zip_sha256):
            return entry
        _discard(entry)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=cache_folder))
    try:
        files = extract(zip_path, staging / "package")
        record = {"zip_sha256": zip_sha256, "files": files}
        with os.fdopen(os.open(staging / "package" / RECORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644),
                       "w", encoding="utf-8") as stream:
            json.dump(record, stream)
        try:
            os.rename(staging / "package", entry)
        except OSError:
            # Another process renamed its copy of the same zip into place first: use that one.
            if not _entry_is_intact(entry, zip_sha256):
                raise ArchiveError(f"'{entry}' changed while '{zip_path}' was being unpacked; try again.") from None
    except OSError as error:
        raise ArchiveSpaceError(f"'{zip_path}' could not be unpacked into '{cache_folder}' ({error.strerror}). "
                                "Free disk space or set ISSEG_CACHE to a writable folder.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def _entry_is_intact(entry: Path, zip_sha256: str) -> bool:
    """True when `entry` holds exactly the files recorded at unpacking, each with its recorded checksum."""
    try:
        record = json.loads((entry / RECORD_FILE).read_text(encoding="utf-8"))
        present = {path.relative_to(entry).as_posix() for path in entry.rglob("*")
                   if path.is_file() or path.is_symlink()} - {RECORD_FILE}
        if record.get("zip_sha256") != zip_sha256 or present != set(record["files"]):
            return False
        return all(not (entry / name).is_symlink() and sha256_file(entry / name) == checksum
                   for name, checksum in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way at once (rename), then delete it."""
    discarded = entry.with_name(f"{DISCARDED_PREFIX}{os.getpid()}-{entry.name}")
    try:
        os.rename(entry, discarded)
    except OSError:
        return  # another process discarded it already
    shutil.rmtree(discarded, ignore_errors=True)


def _remove_abandoned(cache_folder: Path) -> None:
    """Delete staging and discarded folders of processes that no longer run (killed mid-unpack)."""
    for folder in cache_folder.iterdir():
        for prefix in (STAGING_PREFIX, DISCARDED_PREFIX):
            if folder.name.startswith(prefix):
                pid = folder.name[len(prefix):].split("-")[0]
                if pid.isdigit() and not _process_alive(int(pid)):
                    shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True  # no cheap check on Windows: leave the folder (it is hidden and harmless)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"
