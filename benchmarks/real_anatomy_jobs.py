"""Running the steps of the real-anatomy benchmarks (benchmarks/real_anatomy.py): logging, engine
subprocesses, done-markers that let an interrupted run resume, the wall-clock budget and the
data-set chains run side by side.

Nothing here knows what a step computes.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
ENGINE_DIR = REPO_ROOT / "InferenceSpecificSeg"

STARTED = time.monotonic()  # the script's start: the log's clock and the time budget count from it


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f} s] {message}", flush=True)


def engine_env(threads: int | None = None) -> dict:
    """The environment of an engine subprocess: the engine on PYTHONPATH; `threads` CPU threads
    (OMP_NUM_THREADS, unless set already) where several subprocesses share the machine."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(command: Sequence, log_path: Path, echo: Iterable[str] = (), threads: int | None = None) -> float:
    """Run a command (printed first), its stdout and stderr into log_path; lines of stdout holding any
    of the `echo` strings are printed too. Returns its seconds; raises on a non-zero exit, with the
    log's tail."""
    command = [str(c) for c in command]
    say("$ " + shlex.join(command))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo = tuple(echo)
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=engine_env(threads), cwd=REPO_ROOT, encoding="utf-8")
        for line in process.stdout:
            log.write(line)
            if any(key in line for key in echo):
                print("    " + line.rstrip()[:300], flush=True)
        code = process.wait()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-30:]
        raise RuntimeError(f"command failed with exit code {code} (log {log_path}):\n" + "\n".join(tail))
    return time.monotonic() - started


def outside_repository_or_ignored(path: Path) -> bool:
    """True when path is outside the repository, or inside it but git-ignored (e.g. runs/: a folder
    to carry to another machine). Where git cannot tell (no git, or a copy of the tree without .git)
    the path is allowed."""
    path = Path(path).expanduser().resolve()
    if not path.is_relative_to(REPO_ROOT):
        return True
    try:
        return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT,
                              capture_output=True).returncode != 1  # 1: not ignored
    except OSError:
        return True


def isseg_command(*args) -> list[str]:
    return [sys.executable, "-m", "isseg.cli", *map(str, args)]


def process_pool(jobs: int):
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(max(1, jobs))


class Steps:
    """Done-markers in the work folder (one file per step holding its seconds), so that an interrupted
    run resumes where it stopped; `force` redoes every step."""

    def __init__(self, work: Path, force: bool):
        self.dir = work / "done"
        self.force = force
        self.dir.mkdir(parents=True, exist_ok=True)

    def marked(self, name: str) -> bool:
        """True when the step was done before (and not `force`)."""
        return not self.force and (self.dir / name).exists()

    def done(self, name: str) -> bool:
        """marked(name), saying so."""
        if self.marked(name):
            say(f"{name}: done before, skipped (delete {self.dir / name} or use --force to redo)")
            return True
        return False

    def mark(self, name: str, seconds: float) -> None:
        (self.dir / name).write_text(f"{seconds:.1f}\n", encoding="utf-8")

    def seconds(self) -> dict[str, float]:
        """Seconds of every step done so far (also those of an earlier, interrupted run), oldest first."""
        if self.force:
            return {}
        marks = sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime)
        return {p.name: float(p.read_text(encoding="utf-8")) for p in marks}

    def run(self, name: str, function: Callable, *arguments):
        """function(*arguments) unless the step is done; marks it done. Returns its value (None when skipped)."""
        if self.done(name):
            return None
        say(f"== {name}")
        started = time.monotonic()
        value = function(*arguments)
        seconds = time.monotonic() - started
        self.mark(name, seconds)
        say(f"== {name} done in {seconds:.0f} s")
        return value


class Budget:
    """A wall-clock budget counted from the start of the script; None: unlimited."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else STARTED + 60.0 * minutes

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def allows(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        return self.left() - reserve_s >= estimate_s


def run_chains(names: Sequence[str], function: Callable[[str], object], parallel: bool) -> tuple[dict, dict]:
    """function(name) for every name, in threads at once or one after the other; one that raises does
    not stop the others. Returns (name -> value, name -> error message of the ones that raised)."""
    with ThreadPoolExecutor(max_workers=len(names) if parallel and names else 1) as pool:
        futures = {name: pool.submit(function, name) for name in names}
    values, failures = {}, {}
    for name, future in futures.items():
        error = future.exception()
        if error is None:
            values[name] = future.result()
        else:
            failures[name] = f"{type(error).__name__}: {error}"
            say(f"!! {name} failed: {failures[name]}")
    return values, failures
