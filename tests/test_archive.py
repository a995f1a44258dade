"""Safe tarballs: links, devices, absolute paths, '..' and oversized archives are refused before anything is written."""
from __future__ import annotations

import io
import tarfile

import pytest

from utils.archive import ArchiveError, extract, read_member


def make_tarball(path, members):
    """A .tar.gz with ``members``: (name, bytes) for files, or a prepared TarInfo for anything else."""
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def special(name, kind, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_reads_and_extracts_a_plain_tarball(tmp_path):
    tarball = make_tarball(tmp_path / "ok.tar.gz", [("model/checkpoint.pt", b"weights"), ("README", b"hi")])
    assert read_member(tarball, ".pt") == ("model/checkpoint.pt", b"weights")
    folder = extract(tarball, tmp_path / "out")
    assert (folder / "model" / "checkpoint.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.tar.gz", "out"]


@pytest.mark.parametrize("member, message", [
    (("/etc/evil.pt", b"x"), "absolute"),
    (("../evil.pt", b"x"), "leaves the folder"),
    (("model/../../evil.pt", b"x"), "leaves the folder"),
    (special("model/link.pt", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (special("model/hard.pt", tarfile.LNKTYPE, "model/checkpoint.pt"), "is a link"),
    (special("model/dev", tarfile.CHRTYPE), "not a regular file"),
    (special("model/fifo", tarfile.FIFOTYPE), "not a regular file"),
])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, member, message):
    tarball = make_tarball(tmp_path / "bad.tar.gz", [("model/checkpoint.pt", b"weights"), member])
    with pytest.raises(ArchiveError, match=rf"bad\.tar\.gz.*{message}"):
        extract(tarball, tmp_path / "out")
    with pytest.raises(ArchiveError, match=message):
        read_member(tarball, ".pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_size_cap_and_unreadable_files(tmp_path):
    tarball = make_tarball(tmp_path / "big.tar.gz", [("a.pt", b"x" * 600), ("b.bin", b"y" * 600)])
    with pytest.raises(ArchiveError, match="more than 1000 bytes"):
        extract(tarball, tmp_path / "out", max_bytes=1000)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[:40])
    with pytest.raises(ArchiveError, match="truncated.tar.gz"):
        extract(truncated, tmp_path / "out")
    with pytest.raises(ArchiveError, match=r"expected one '\*\.pth' file"):
        read_member(tarball, ".pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tar.gz", "truncated.tar.gz"]
