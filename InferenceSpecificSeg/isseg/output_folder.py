"""One run owns its output folder (docs/worker-protocol.md, "Files in DIR").

`OutputFolder.claim()` creates the folder, takes the lock (a second run into the same folder is
refused, naming the one that holds it), and deals with results of an earlier run: refused unless
`overwrite`, then removed, `report.json` first, so that no moment leaves an old report beside new
files. Completeness rule: `report.json` is written last, so a folder without it holds no complete
result, whatever else it holds; a killed run leaves snapshots and settings but no report.

The lock is an advisory lock (flock on POSIX, msvcrt on Windows) on `.isseg-run.lock`, held until
`release()` or the process ends: the operating system drops it even after a SIGKILL, so a stale lock
file never blocks the next run. The lock file is opened without following links and must be a plain
file with one name; it also serves as the writability probe (no separate probe file). Its content
names the holder: process id, host and start time.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import socket
from pathlib import Path

from .errors import DiskError, OutputFolderError
from .protocol import CANCEL_FILE, LOCK_FILE, REPORT_FILE, RUN_FILE_PATTERNS

LOCK_ATTEMPTS = 3  # the lock file may be replaced between opening and locking it by a finishing run


def earlier_results(folder: Path) -> list[Path]:
    """Files in `folder` a run writes (RUN_FILE_PATTERNS), report.json first, then by name."""
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir()
             if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in RUN_FILE_PATTERNS)]
    return sorted(found, key=lambda path: (path.name != REPORT_FILE, path.name))


class OutputFolder:
    """The output folder of one run: `path` (created if needed); `overwrite` allows removing the files of
    an earlier run there. Use as a context manager, or call claim() and release()."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self._lock_fd: int | None = None

    def __enter__(self) -> "OutputFolder":
        self.claim()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def claim(self) -> None:
        """Create and lock the folder and clear what an earlier run left. Raises DiskError (exit 7) when it
        cannot be written, OutputFolderError (exit 7) when another run holds it or earlier results are
        there and `overwrite` is off."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._lock()
        except OSError as error:
            raise DiskError(f"Cannot write to the output folder '{self.path}' ({error.strerror}). "
                            "Choose a folder you can write to, with free space.") from None
        try:
            self._clear_earlier_results()
        except BaseException:
            self.release()
            raise

    def _lock(self) -> int:
        lock_path = self.path / LOCK_FILE
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(LOCK_ATTEMPTS):
            fd = os.open(lock_path, flags, 0o644)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputFolderError(
                    f"Another run is writing into '{self.path}' ({holder}). Wait for it to finish, cancel it, "
                    "or choose another output folder.")
            opened, named = os.fstat(fd), _stat_or_none(lock_path)
            if named is not None and (named.st_ino, named.st_dev) == (opened.st_ino, opened.st_dev):
                if opened.st_nlink != 1:
                    os.close(fd)
                    raise OutputFolderError(f"'{lock_path}' has other names (hard links); remove it and run again.")
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps(_holder_record()).encode("utf-8"))
                except OSError:  # e.g. the disk is full: leave nothing behind
                    lock_path.unlink(missing_ok=True)
                    os.close(fd)
                    raise
                return fd
            os.close(fd)  # a finishing run removed the file after we opened it: lock the new one
        raise OutputFolderError(f"Could not lock '{lock_path}': it keeps changing. Choose another output folder.")

    def _clear_earlier_results(self) -> None:
        earlier = earlier_results(self.path)
        if earlier and not self.overwrite:
            names = ", ".join(path.name for path in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
            raise OutputFolderError(
                f"The output folder '{self.path}' holds the results of an earlier run ({names}). Choose an empty "
                "folder, or pass --overwrite to remove them first (other files there are left alone).")
        try:
            for path in earlier:  # report.json first: from here on nothing there looks complete
                path.unlink()
            (self.path / CANCEL_FILE).unlink(missing_ok=True)
        except OSError as error:
            raise DiskError(f"Cannot remove the earlier results in '{self.path}' ({error.strerror}). "
                            "Remove them yourself or choose another output folder.") from None

    def release(self) -> None:
        """Remove the lock file and drop the lock (the results stay)."""
        if self._lock_fd is None:
            return
        try:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass  # the lock is dropped with the descriptor anyway
        os.close(self._lock_fd)
        self._lock_fd = None


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on the open file `fd`; False when another process holds it."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "a process that is just starting"


def _stat_or_none(path: Path):
    try:
        return os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
