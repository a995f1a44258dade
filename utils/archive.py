"""Tarballs opened safely: regular files and folders only, relative paths without '..', a size cap.

Every member is checked before anything is read or written; a tarball that fails a check is refused as a whole.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

MAX_ARCHIVE_BYTES = 64 * 2 ** 20  # unpacked size cap: the largest pretrained tarball unpacks to ~1.2 MB


class ArchiveError(ValueError):
    """A tarball that is unreadable or holds something unsafe; the message names the file."""


def _checked_members(tar: tarfile.TarFile, source: Path, max_bytes: int) -> list[tarfile.TarInfo]:
    members, total = tar.getmembers(), 0
    for member in members:
        name = member.name
        if member.issym() or member.islnk():
            raise ArchiveError(f"{source}: refused: member {name!r} is a link")
        if not (member.isfile() or member.isdir()):
            raise ArchiveError(f"{source}: refused: member {name!r} is not a regular file or folder")
        path = PurePosixPath(name)
        if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts or ":" in path.parts[0]:
            raise ArchiveError(f"{source}: refused: member {name!r} has an absolute path or leaves the folder")
        total += member.size
        if total > max_bytes:
            raise ArchiveError(f"{source}: refused: unpacks to more than {max_bytes} bytes")
    return members


def _open(source: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(source, "r:*")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ArchiveError(f"cannot read tarball {source}: {error}") from None


def read_member(source: str | os.PathLike, suffix: str, max_bytes: int = MAX_ARCHIVE_BYTES) -> tuple[str, bytes]:
    """(name, bytes) of the one regular file of tarball ``source`` whose name ends with ``suffix``."""
    source = Path(source)
    with _open(source) as tar:
        try:
            members = _checked_members(tar, source, max_bytes)
            matches = [m for m in members if m.isfile() and m.name.endswith(suffix)]
            if len(matches) != 1:
                raise ArchiveError(f"{source}: expected one '*{suffix}' file, found "
                                   f"{[m.name for m in matches] or 'none'}")
            return matches[0].name, tar.extractfile(matches[0]).read()
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ArchiveError(f"cannot read tarball {source}: {error}") from None


def extract(source: str | os.PathLike, destination: str | os.PathLike, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Unpack tarball ``source`` into the new folder ``destination``, all or nothing.

    The members are unpacked into a temporary folder beside ``destination`` that is renamed at the end.
    """
    source, destination = Path(source), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".tmp-{uuid.uuid4().hex}-{destination.name}"
    try:
        with _open(source) as tar:
            try:
                members = _checked_members(tar, source, max_bytes)
                # the checks above already refuse what the "data" filter would; it stays as a second guard
                tar.extractall(tmp, members=members, filter="data")
            except (tarfile.TarError, OSError, EOFError) as error:
                raise ArchiveError(f"cannot unpack tarball {source}: {error}") from None
        os.replace(tmp, destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return destination
