"""Weights embedded in an archive (`encode --embed-model`): copied in whole before a commit names them,
found again by decode, and checked by verify."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ...codecs.errors import ArchiveError
from ..storage import LinkRefused, Location
from .layout import MODEL_DIR
from .records import EmbeddedModel, Manifest

def embed_weights(archive: Location, codec) -> EmbeddedModel:
    """Copy the weights `codec` loaded into models/<fingerprint>/, each file whole (only what the loaders
    read: `Codec.weights_files`). The caller commits the manifest that names the folder only after this
    returns, so no manifest ever names a partial folder."""
    fingerprint = codec.fingerprint.hex()
    files = []
    for path, source in codec.weights_files().items():
        data = Path(source).read_bytes()
        archive.write_atomic(f"{MODEL_DIR}/{fingerprint}/{path}", data)
        files.append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return EmbeddedModel(fingerprint, sorted(files, key=lambda f: f["path"]))


def local_weights_folder(archive: Location, model: EmbeddedModel) -> str:
    """A local folder holding an embedded model: the archive's own on local disk (none of it a link); for
    a remote archive, the model cache's folder for its fingerprint, fetched once, whole or not at all."""
    archive = archive.confined()
    if archive.is_local:
        try:
            folder = archive.path(model.folder)
        except LinkRefused as exc:
            raise ArchiveError(str(exc)) from None
        for parent, folders, files in os.walk(folder):  # the loaders read any file in it: none may be a link
            for name in folders + files:
                if os.path.islink(os.path.join(parent, name)):
                    relative = os.path.relpath(os.path.join(parent, name), archive.root)
                    raise ArchiveError(f"{relative} in {archive.url} is a symbolic link; diffarc loads no weights "
                                       "through a link inside an archive")  # fmt: skip
        return folder
    from ...codecs.registry import cache_weights

    files = [f["path"] for f in model.files]
    return str(cache_weights(bytes.fromhex(model.fingerprint), archive.fs, archive.path(model.folder), files))


def check_embedded_weights(archive: Location, manifest: Manifest) -> list[str]:
    """Problems with the archive's embedded weights: files missing or changed since they were listed, and
    weights whose fingerprint, recomputed from the files, is not the one their folder is named by.

    The files are read once: hashed, and written to a scratch folder that the fingerprint is recomputed
    from — a path no model cache has seen, so the figure comes from these bytes, not from a earlier load.
    """
    from ...codecs.registry import codec_class, create_codec

    archive = archive.confined()
    problems = []
    for model in manifest.models:
        spec = next((s for s in manifest.specs if s.fingerprint == model.fingerprint), None)
        if spec is None:
            problems.append(f"{model.folder}: no codec spec of this archive uses these weights")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            damaged = False
            for file in model.files:
                path = f"{model.folder}/{file['path']}"
                try:
                    data = archive.read(path)
                except FileNotFoundError:
                    problems.append(f"{path}: listed in the manifest but missing")
                    damaged = True
                    continue
                except LinkRefused as exc:
                    problems.append(str(exc))
                    damaged = True
                    continue
                if len(data) != file["bytes"] or hashlib.sha256(data).hexdigest() != file["sha256"]:
                    problems.append(f"{path}: size or SHA-256 differs from the manifest (damaged or replaced)")
                    damaged = True
                (Path(scratch) / file["path"]).parent.mkdir(parents=True, exist_ok=True)
                (Path(scratch) / file["path"]).write_bytes(data)
            if damaged:
                continue
            try:
                codec = create_codec(spec.name, {**spec.params, **codec_class(spec.name).locations_in(scratch)})
                found = codec.fingerprint.hex()
            except Exception as exc:  # weights that no longer load are as broken as weights that differ
                problems.append(f"{model.folder}: weights do not load ({type(exc).__name__}: {exc})")
                continue
        if found != model.fingerprint:
            problems.append(f"{model.folder}: the weights' fingerprint is {found}, not the one the folder is named by")
    return problems
