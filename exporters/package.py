"""Writing a package directory atomically.

Export builds everything in a hidden sibling directory and renames it into
place only when every graph is written and verified and the manifest (written
last) is complete. An export that fails or is killed leaves no directory at
the output path, and the partial one has no manifest, so nothing loads it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mmedge.errors import ExportError
from mmedge.manifest import MANIFEST_NAME, FileEntry, sha256_file


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists; pass --overwrite to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file; choose a directory path")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(f"output {out} is a non-empty directory that is not an mmedge package; refusing to replace it")


@contextlib.contextmanager
def staged_package(out: Path, overwrite: bool) -> Iterator[Path]:
    out = out.resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if not (stage / MANIFEST_NAME).exists():
            raise ExportError("internal error: package staged without a manifest")
        os.chmod(stage, 0o755)
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


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file in the package, manifest excepted."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            entries[path.relative_to(directory).as_posix()] = FileEntry(sha256_file(path), path.stat().st_size)
    return entries
