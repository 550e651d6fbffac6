"""rfs/script/basearchive.py: an image archive (docker-archive, OCI layout) told from a root
filesystem tarball, the image ID a docker-archive names, and the archives refused."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Literal

import pytest

from rfs.engine.fake import FakeEngine
from rfs.errors import ScriptError
from rfs.script.basearchive import BaseArchive, inspect_base_archive


def tarball(path: Path, members: dict[str, bytes], mode: Literal["w", "w:gz"] = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_docker_save_archive_names_its_image(tmp_path: Path) -> None:
    engine = FakeEngine()
    image = engine.add_image("fake/base:1", {"/bin/sh": b"#!fake\n"})
    path = tmp_path / "base.tar"
    with path.open("wb") as out:
        engine.save_image("fake/base:1", out)
    assert inspect_base_archive(path) == BaseArchive(True, image)


def test_manifest_forms(tmp_path: Path) -> None:
    hexid = "0123456789abcdef" * 4
    old = [{"Config": f"{hexid}.json", "Layers": []}]
    oci = [{"Config": f"blobs/sha256/{hexid}", "Layers": []}]
    odd = [{"Config": "config.json"}]
    for name, manifest, expected in [
        ("old", old, f"sha256:{hexid}"),
        ("oci", oci, f"sha256:{hexid}"),
        ("odd", odd, None),
        ("none", [], None),
        ("nocfg", [{"Layers": []}], None),
    ]:
        path = tarball(tmp_path / f"{name}.tar", {"./manifest.json": json.dumps(manifest).encode()})
        assert inspect_base_archive(path) == BaseArchive(True, expected), name


def test_two_images_are_refused(tmp_path: Path) -> None:
    manifest = [{"Config": "a.json"}, {"Config": "b.json"}]
    path = tarball(tmp_path / "two.tar", {"manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(ScriptError) as caught:
        inspect_base_archive(path, where="container.archive")
    (problem,) = caught.value.problems
    assert problem.path == "container.archive"
    assert "holds 2 images; save exactly one" in problem.message


def test_oci_layout_and_rootfs_tarballs(tmp_path: Path) -> None:
    oci = tarball(tmp_path / "oci.tar", {"index.json": b"{}", "oci-layout": b"{}"})
    assert inspect_base_archive(oci) == BaseArchive(True)
    index_only = tarball(tmp_path / "index.tar", {"index.json": b"{}"})
    assert inspect_base_archive(index_only) == BaseArchive(False)  # no oci-layout: files
    rootfs = tarball(tmp_path / "rootfs.tar.gz", {"bin/sh": b"x", "etc/os": b"y"}, "w:gz")
    assert inspect_base_archive(rootfs) == BaseArchive(False)


def test_empty_and_unreadable_archives_are_refused(tmp_path: Path) -> None:
    empty = tarball(tmp_path / "empty.tar", {})
    with pytest.raises(ScriptError, match="is an empty tar archive"):
        inspect_base_archive(empty)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tarball" * 100)
    with pytest.raises(ScriptError, match="is not a readable tar archive"):
        inspect_base_archive(junk)
    with pytest.raises(ScriptError, match="is not a readable tar archive"):
        inspect_base_archive(tmp_path / "missing.tar")
