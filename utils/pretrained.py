"""Pretrained models: the manifest, a checksummed download cache, and safe unpacking.

``python -m utils.pretrained list`` lists the models of ``pretrained_models/manifest.json``;
``python -m utils.pretrained download NAME|all`` downloads them into the cache (``$LEARNSIM_CACHE``, else
``~/.cache/learnsim``). A download goes to a temporary file that is renamed into the cache only after its size and
checksum are verified, so the cache never holds a partial or unverified file; a file copied into the cache by hand
is verified on first use, and a cached file that fails its check is reported, not replaced. Tarballs are unpacked with
utils.archive. Models shipped in the repository (a ``url`` relative to the manifest) are verified in place.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils.archive import MAX_ARCHIVE_BYTES, extract
from utils.io import atomic_write

MANIFEST = Path(__file__).resolve().parents[1] / "pretrained_models" / "manifest.json"
MANIFEST_VERSION = 1
CACHE_ENV = "LEARNSIM_CACHE"
PREFIX = "pretrained:"  # "pretrained:NAME" names a model of the manifest wherever a checkpoint path is expected
KINDS = ("voxelmorph", "learnsim-metric", "authors-learnsim-metric")
CHECKSUMS = ("sha256", "git-blob-sha1")  # git-blob-sha1: what `git hash-object` prints for the file
CHUNK = 1 << 20
TIMEOUT_S = 60


class PretrainedError(ValueError):
    """An unknown model, a failed download, a checksum mismatch or a bad manifest; the message names the file."""


@dataclass(frozen=True)
class PretrainedModel:
    """One entry of the manifest."""

    name: str
    kind: str  # one of KINDS: how the file is loaded
    description: str
    url: str  # http(s):// or file:// URL, or a path relative to the manifest's folder (shipped in the repository)
    size: int | None  # bytes of the file at ``url``; None where it is not published
    checksum: str  # "<algorithm>:<hex digest>", algorithm one of CHECKSUMS
    config: str | None  # the config the model belongs to, relative to the repository root

    @property
    def filename(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith((".tar.gz", ".tgz", ".tar"))


def load_manifest(path: str | os.PathLike = MANIFEST) -> dict[str, PretrainedModel]:
    """name -> PretrainedModel of a manifest file; a malformed entry fails naming the file and the entry."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version, entries = manifest["format_version"], list(manifest["models"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PretrainedError(f"cannot read the manifest {path}: {error!r}") from None
    if version != MANIFEST_VERSION:
        raise PretrainedError(f"{path}: manifest format_version {version!r} is not supported (expected "
                              f"{MANIFEST_VERSION})")
    fields = set(PretrainedModel.__dataclass_fields__)
    models = {}
    for i, entry in enumerate(entries):
        where = f"{path}: models[{i}]"
        if not isinstance(entry, dict) or set(entry) != fields:
            keys = sorted(entry) if isinstance(entry, dict) else entry
            raise PretrainedError(f"{where}: expected the keys {sorted(fields)}, got {keys}")
        model = PretrainedModel(**entry)
        algorithm, _, digest = model.checksum.partition(":")
        if model.kind not in KINDS or algorithm not in CHECKSUMS or not digest:
            raise PretrainedError(f"{where} ({model.name}): kind must be one of {KINDS} and checksum "
                                  f"'<{'|'.join(CHECKSUMS)}>:<hex>', got {model.kind!r}, {model.checksum!r}")
        if model.name in models:
            raise PretrainedError(f"{where}: the name {model.name!r} appears twice")
        models[model.name] = model
    return models


def get_model(name: str, manifest: str | os.PathLike = MANIFEST) -> PretrainedModel:
    """The manifest entry called ``name``; an unknown name fails listing the known ones."""
    models = load_manifest(manifest)
    if name not in models:
        raise PretrainedError(f"unknown pretrained model {name!r} (in {manifest}: {', '.join(models)})")
    return models[name]


def cache_dir() -> Path:
    """Where downloads are kept: ``$LEARNSIM_CACHE``, else ``~/.cache/learnsim``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "learnsim")


def file_checksum(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file: SHA-256, or the git blob SHA-1 (SHA-1 of ``b"blob <size>\\0"`` + the bytes)."""
    path = Path(path)
    if algorithm == "sha256":
        digest = hashlib.sha256()
    elif algorithm == "git-blob-sha1":
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        raise PretrainedError(f"unknown checksum algorithm {algorithm!r} (known: {CHECKSUMS})")
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(model: PretrainedModel, path: Path, source: str) -> None:
    """Raise unless the file has the manifest's size and checksum."""
    size = path.stat().st_size
    if model.size is not None and size != model.size:
        what = "truncated" if size < model.size else "too large"
        raise PretrainedError(f"{model.name}: {source} is {what}: {size} bytes, expected {model.size}")
    algorithm, _, expected = model.checksum.partition(":")
    found = file_checksum(path, algorithm)
    if found != expected.lower():
        raise PretrainedError(f"{model.name}: {source} fails its {algorithm} check: expected {expected}, got {found}")


def _source_path(model: PretrainedModel, manifest: Path) -> Path | None:
    """The local file of a model shipped with the repository (a relative ``url``), else None."""
    scheme = urllib.parse.urlparse(model.url).scheme
    return None if scheme else (manifest.parent / model.url).resolve()


def _download(model: PretrainedModel, target: Path, progress: bool) -> None:
    """Fetch ``model.url`` into a temporary file beside ``target``; rename it only once verified."""
    limit = model.size if model.size is not None else MAX_ARCHIVE_BYTES
    with atomic_write(target) as tmp:
        try:
            with urllib.request.urlopen(model.url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as file, \
                    tqdm(total=model.size, unit="B", unit_scale=True, desc=model.name, file=sys.stderr,
                         disable=None if progress else True) as bar:  # None: no bar when stderr is not a terminal
                received = 0
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    received += len(chunk)
                    if received > limit:
                        raise PretrainedError(f"{model.name}: {model.url} sends more than {limit} bytes")
                    file.write(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as error:
            if isinstance(error, PretrainedError):
                raise
            reason = getattr(error, "reason", error)
            raise PretrainedError(f"{model.name}: cannot download {model.url} ({reason}): offline, or a wrong URL? "
                                  f"Nothing was written to {target.parent}. To install it by hand, copy "
                                  f"{model.filename} to {target} (it is verified on first use)") from None
        verify(model, tmp, f"the download of {model.url}")


def fetch(name: str, manifest: str | os.PathLike = MANIFEST, cache: str | os.PathLike | None = None,
          progress: bool = True) -> Path:
    """The verified file of model ``name``: shipped in the repository, already cached, or downloaded now."""
    manifest = Path(manifest)
    model = get_model(name, manifest)
    local = _source_path(model, manifest)
    if local is not None:
        if not local.is_file():
            raise PretrainedError(f"{model.name}: {local} (named in {manifest}) does not exist")
        verify(model, local, str(local))
        return local
    target = Path(cache or cache_dir()) / model.filename
    if target.is_file():  # downloaded, or copied there by hand: used once it verifies, reported (and kept) otherwise
        try:
            verify(model, target, f"the cached file {target}")
        except PretrainedError as error:
            raise PretrainedError(f"{error}; it was left as it is: remove it to download {model.name} again, or "
                                  f"replace it with a good copy") from None
        return target
    _download(model, target, progress)
    return target


def checkpoint_path(name: str, manifest: str | os.PathLike = MANIFEST, cache: str | os.PathLike | None = None,
                    progress: bool = True) -> Path:
    """The checkpoint file of model ``name``, downloaded and, for a tarball, unpacked (its one ``.pt`` file)."""
    path = fetch(name, manifest, cache, progress)
    if not get_model(name, manifest).is_archive:
        return path
    folder = path.parent / f"{name}.unpacked"
    if not folder.is_dir():
        try:
            extract(path, folder)
        except OSError:
            if not folder.is_dir():  # not another process that unpacked it first
                raise
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth"))
    if len(found) != 1:
        raise PretrainedError(f"{name}: expected one .pt file in {path}, found {[p.name for p in found] or 'none'}")
    return found[0]


def resolve_pretrained(spec: str | os.PathLike, manifest: str | os.PathLike = MANIFEST,
                       cache: str | os.PathLike | None = None) -> tuple[Path, PretrainedModel | None]:
    """(checkpoint path, manifest entry) of ``"pretrained:NAME"``; (the path, None) for anything else."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return Path(spec), None
    name = text[len(PREFIX):]
    return checkpoint_path(name, manifest, cache), get_model(name, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.pretrained", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the models of the manifest")
    download = commands.add_parser("download", help="download (and verify and unpack) models into the cache")
    download.add_argument("names", nargs="+", metavar="NAME|all")
    args = parser.parse_args(argv)
    models = load_manifest()
    if args.command == "list":
        for model in models.values():
            size = f"{model.size / 1e6:.1f} MB" if model.size is not None else "size not published"
            sys.stdout.write(f"{model.name:20s} {model.kind:24s} {size:20s} {model.description}\n")
        return
    names = list(models) if "all" in args.names else args.names
    failed = []
    for name in names:
        try:
            sys.stdout.write(f"{name}: {checkpoint_path(name)}\n")
        except (PretrainedError, ValueError) as error:
            sys.stderr.write(f"error: {error}\n")
            failed.append(name)
    if failed:
        sys.exit(f"{len(failed)} of {len(names)} models failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
