"""Writing a package directory atomically.

Export builds everything in a hidden sibling directory and renames it into
place only when every graph is written and verified and the manifest (written
last) is complete. An export that fails or is killed leaves no directory at
the output path, and the partial one has no manifest, so nothing loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mmedge.errors import ExportError
from mmedge.manifest import MANIFEST_NAME, FileEntry, sha256_file

log = logging.getLogger(__name__)

_STAGED: set[Path] = set()  # this process's staging folders, for remove_staged() when it is stopped by force


def remove_staged() -> None:
    """Remove this process's staging folders now: for a process about to end without unwinding (mmedge.cli's
    stop on SIGTERM during a long engine call). What an engine call still running writes there afterwards is
    removed by the next export into the same folder (_remove_stale: no process holds its lock by then)."""
    for stage in list(_STAGED):
        shutil.rmtree(stage, ignore_errors=True)


def check_output(out: Path, overwrite: bool) -> None:
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ExportError(f"cannot write the package into {out.parent}: {parent} is a file, not a folder; choose "
                          "another -o")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write the package into {parent} (permission denied); choose another -o")
    if out.exists() and overwrite and out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"--overwrite cannot replace {out}: it is read-only; change its permissions or choose another -o")
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists; pass --overwrite to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(f"output {out} is a non-empty directory that is not an mmedge package; refusing to replace it")


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.export-lock"


def _try_lock(path: Path):
    """An exclusive lock on `path` (created if missing) without waiting: the open file, or None if another
    process holds it. fcntl locks end with their process, however it ends, so a killed export frees its lock."""
    import fcntl

    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()  # the holder removed the file between our open and our lock: lock the new one


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Held for a whole export to `out`: a second export to the same path at the same time fails at once with one
    line instead of both writing and one silently replacing the other."""
    out = out.resolve()
    created = [folder for folder in out.parents if not folder.exists()]  # innermost first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the folder {out.parent}: {exc.strerror or exc}; choose another -o") from None
    path = _lock_path(out)
    fh = _try_lock(path)
    if fh is None:
        owner = path.read_text().strip() or "another process"
        raise ExportError(f"another export is writing {out} right now ({owner}); wait for it to finish or choose "
                          "another -o")
    try:
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        _remove_stale(out.parent, own=out.name)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fh.close()
        if not out.exists():  # an export that wrote nothing leaves none of the folders it made for it
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _remove_stale(parent: Path, own: str) -> None:
    """Staging folders of exports that are no longer running (killed, or their machine lost power): no process
    holds their output's lock (`own`'s lock is ours), so nothing will ever finish or remove them."""
    removed = []
    for stage in sorted(parent.glob(".*.partial-*")) + sorted(parent.glob(".*.old-*")):
        name = stage.name[1:].rsplit(".partial-" if ".partial-" in stage.name else ".old-", 1)[0]
        lock = _lock_path(parent / name)
        fh = None if name == own else _try_lock(lock)
        if name == own or fh is not None:
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage.name)
        if fh is not None:
            lock.unlink(missing_ok=True)
            fh.close()
    if removed:
        log.warning("removed %d staging folder(s) left by interrupted exports in %s: %s", len(removed), parent,
                    ", ".join(removed))


@contextlib.contextmanager
def staged_package(out: Path, overwrite: bool) -> Iterator[Path]:
    out = out.resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    _STAGED.add(stage)
    try:
        yield stage
        if not (stage / MANIFEST_NAME).exists():
            raise ExportError("internal error: package staged without a manifest")
        # a package is read by whoever runs it (a service account, another user): mkdtemp made the folder 0700,
        # and onnx writes external data files 0600
        os.chmod(stage, 0o755)
        for path in stage.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "pkg")
            os.rename(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        _STAGED.discard(stage)


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file in the package, manifest excepted."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            entries[path.relative_to(directory).as_posix()] = FileEntry(sha256_file(path), path.stat().st_size)
    return entries
