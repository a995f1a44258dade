"""Pretrained models: manifest, checksummed download cache, unpacking. Never touches the network: file:// URLs."""
from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import pytest

from utils import pretrained
from utils.archive import ArchiveError
from utils.pretrained import PretrainedError, checkpoint_path, fetch, file_checksum, load_manifest, resolve_pretrained

from test_archive import make_tarball, special

ROOT = Path(__file__).resolve().parents[1]
AUTHORS = ROOT.parent / "shared" / "pretrained" / "authors"
needs_authors = pytest.mark.skipif(not AUTHORS.is_dir(), reason=f"{AUTHORS} is absent (the authors' tarballs)")


def entry(name, path, checksum=None, size="auto", kind="voxelmorph", url=None):
    data = Path(path).read_bytes()
    return {"name": name, "kind": kind, "description": "test", "url": url or Path(path).as_uri(),
            "size": len(data) if size == "auto" else size,
            "checksum": checksum or "sha256:" + hashlib.sha256(data).hexdigest(), "config": None}


def write_manifest(folder, *entries):
    path = Path(folder) / "manifest.json"
    path.write_text(json.dumps({"format_version": 1, "models": list(entries)}))
    return path


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def test_the_shipped_manifest_lists_the_authors_six_tarballs():
    models = load_manifest()
    authors = {n: m for n, m in models.items() if m.url.startswith("https://github.com/dgrzech/learnsim/")}
    assert sorted(authors) == sorted(["SSD_learnt", "LCC_learnt", "VXM_SSD_baseline", "VXM_SSD_learnt",
                                      "VXM_LCC_baseline", "VXM_LCC_learnt"])
    assert models["LCC_learnt"].checksum == "git-blob-sha1:38e387f99d89381eeadf3274e4c0527b51e6bb18"
    assert models["SSD_learnt"].checksum == "git-blob-sha1:f9179b355d730ee24c751f73e48216a7d0f93a63"
    for name, model in authors.items():
        assert model.url.endswith(f"/raw/master/pretrained_models/{name}.tar.gz")


@needs_authors
def test_the_manifest_checksums_match_the_authors_files():
    sums = dict(reversed(line.split()) for line in (AUTHORS / "SHA256SUMS").read_text().splitlines())
    for name, model in load_manifest().items():
        if model.kind == "voxelmorph" and name.startswith("VXM_"):
            assert model.checksum == f"sha256:{sums[f'{name}.tar.gz']}"
            assert model.size == (AUTHORS / f"{name}.tar.gz").stat().st_size


def test_git_blob_sha1_is_what_git_prints(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"learnsim\x00\x01" * 1000)
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("git is not available")
    assert file_checksum(path, "git-blob-sha1") == git.stdout.strip()
    assert file_checksum(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()


@needs_authors
def test_download_verify_unpack_and_cache(tmp_path):
    source = AUTHORS / "VXM_SSD_baseline.tar.gz"
    manifest = write_manifest(tmp_path, entry("VXM_SSD_baseline", source))
    cache = tmp_path / "cache"
    path = checkpoint_path("VXM_SSD_baseline", manifest, cache, progress=False)
    assert path == cache / "VXM_SSD_baseline.unpacked" / "checkpoint_VXM_SSD_baseline.pt"
    assert listing(cache) == ["VXM_SSD_baseline.tar.gz", "VXM_SSD_baseline.unpacked", str(path.relative_to(cache))]
    # cached: no second download (the URL now points nowhere)
    gone = (tmp_path / "gone" / source.name).as_uri()
    write_manifest(tmp_path, entry("VXM_SSD_baseline", source, url=gone))
    assert checkpoint_path("VXM_SSD_baseline", manifest, cache, progress=False) == path
    assert resolve_pretrained("pretrained:VXM_SSD_baseline", manifest, cache) == (path, load_manifest(manifest)[
        "VXM_SSD_baseline"])
    assert resolve_pretrained(tmp_path / "x.pt", manifest, cache) == (tmp_path / "x.pt", None)


def test_unknown_name_lists_the_known_ones(tmp_path):
    manifest = write_manifest(tmp_path, entry("demo", make_tarball(tmp_path / "a.tar.gz", [("a.pt", b"x")])))
    with pytest.raises(PretrainedError, match=r"unknown pretrained model 'nope' \(in .*manifest.json: demo\)"):
        resolve_pretrained("pretrained:nope", manifest, tmp_path / "cache")


@pytest.mark.parametrize("problem", ["checksum", "truncated", "git-blob", "offline"])
def test_bad_downloads_fail_clearly_and_leave_nothing(tmp_path, monkeypatch, problem):
    source = make_tarball(tmp_path / "model.tar.gz", [("checkpoint.pt", b"weights" * 100)])
    good = entry("demo", source)
    if problem == "checksum":
        bad, message = {**good, "checksum": "sha256:" + "0" * 64}, "fails its sha256 check: expected 0000"
    elif problem == "git-blob":
        bad, message = {**good, "size": None, "checksum": "git-blob-sha1:" + "1" * 40}, "fails its git-blob-sha1"
    elif problem == "truncated":
        short = tmp_path / "short.tar.gz"
        short.write_bytes(source.read_bytes()[:50])
        bad, message = {**good, "url": short.as_uri()}, rf"is truncated: 50 bytes, expected {good['size']}"
    else:
        def offline(*args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        monkeypatch.setattr(pretrained.urllib.request, "urlopen", offline)
        bad, message = {**good, "url": "https://example.invalid/model.tar.gz"}, "cannot download .*offline"
    manifest = write_manifest(tmp_path, bad)
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedError, match=rf"^demo: .*{message}"):
        checkpoint_path("demo", manifest, cache, progress=False)
    assert listing(cache) == []


def test_a_corrupted_cache_file_is_reported_and_kept(tmp_path):
    source = make_tarball(tmp_path / "model.tar.gz", [("checkpoint.pt", b"weights")])
    manifest = write_manifest(tmp_path, entry("demo", source))
    cache = tmp_path / "cache"
    cached = fetch("demo", manifest, cache, progress=False)
    cached.write_bytes(b"changed")
    with pytest.raises(PretrainedError, match=rf"^demo: the cached file {cached} is truncated.*left as it is: remove "
                                              rf"it to download demo again"):
        fetch("demo", manifest, cache, progress=False)
    assert cached.read_bytes() == b"changed"
    cached.unlink()
    assert fetch("demo", manifest, cache, progress=False).read_bytes() == source.read_bytes()


def test_offline_a_tarball_copied_into_the_cache_is_used(tmp_path, monkeypatch):
    """The offline message says where a copied tarball goes; a copy put there is verified and used."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", offline)
    source = make_tarball(tmp_path / "model.tar.gz", [("checkpoint.pt", b"weights")])
    manifest = write_manifest(tmp_path, {**entry("demo", source), "url": "https://example.invalid/model.tar.gz"})
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedError) as error:
        fetch("demo", manifest, cache, progress=False)
    destination = str(error.value).split("copy model.tar.gz to ")[1].split(" (")[0]
    assert Path(destination) == cache / "model.tar.gz"
    cache.mkdir(exist_ok=True)
    Path(destination).write_bytes(source.read_bytes())
    assert checkpoint_path("demo", manifest, cache, progress=False).read_bytes() == b"weights"


@pytest.mark.parametrize("member, message", [
    (("/abs/evil.pt", b"x"), "absolute path"), (("../evil.pt", b"x"), "leaves the folder"),
    (special("evil.pt", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
])
def test_a_verified_tarball_with_unsafe_members_is_not_unpacked(tmp_path, member, message):
    source = make_tarball(tmp_path / "model.tar.gz", [("checkpoint.pt", b"weights"), member])
    manifest = write_manifest(tmp_path, entry("demo", source))
    cache = tmp_path / "cache"
    with pytest.raises(ArchiveError, match=rf"model\.tar\.gz: refused: .*{message}"):
        checkpoint_path("demo", manifest, cache, progress=False)
    assert listing(cache) == ["model.tar.gz"]  # the verified download stays; nothing was unpacked


def test_files_shipped_in_the_repository_are_verified_in_place(tmp_path):
    shipped = tmp_path / "demo.pt"
    shipped.write_bytes(b"demo weights")
    manifest = write_manifest(tmp_path, {**entry("demo", shipped), "url": "demo.pt", "kind": "learnsim-metric"})
    assert checkpoint_path("demo", manifest, tmp_path / "cache") == shipped
    shipped.write_bytes(b"edited")
    with pytest.raises(PretrainedError, match=r"demo: .*demo\.pt is truncated"):
        checkpoint_path("demo", manifest, tmp_path / "cache")


@pytest.mark.parametrize("change, message", [
    ({"kind": "zip"}, "kind must be one of"), ({"checksum": "md5:abc"}, "checksum"),
    ({"extra": 1}, "expected the keys"),
])
def test_malformed_manifest_entries_name_the_file_and_entry(tmp_path, change, message):
    source = make_tarball(tmp_path / "a.tar.gz", [("a.pt", b"x")])
    manifest = write_manifest(tmp_path, {**entry("demo", source), **change})
    with pytest.raises(PretrainedError, match=rf"manifest.json: models\[0\].*{message}"):
        load_manifest(manifest)
