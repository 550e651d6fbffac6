"""A warm cache changes how fast an image is made, never which image is made.

The differential test walks the schema: for every field (the schema's own table of keys, so a
new field without a case fails `test_every_field_has_a_case`) and every attribute of a package
file (content, the mode bits that reach the image, kind, symlink target), it changes that one
thing in a package whose cache is warm with the other cases' results, builds, and builds the
same package again from an empty cache: the two images must be byte-identical (ext4 and
squashfs images are byte-reproducible). Changes that must not matter (a moved script, a group
execute bit, another name for the same image, `max_age`) must also leave every command cached.

The base image is the local busybox; everything runs on Docker (one case moves to Podman).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rfs.script.schema import _KEYS
from tests.conftest import podman_ready
from tests.constants import BUSYBOX
from tests.fsinspect import list_ext4
from tests.rfsrun import rfs, steps_run

BUILD = """\
[filesystem]
size_mib = 24

[container]
engine = "Docker"
image = { name = "rfs-test/busybox", tag = "1" }
env = { GREETING = "hello" }
hostname = "rfsbox"
volumes = { "/vol" = "/mnt/vol" }

[[copy]]
source = "/files/copied.txt"
destination = "/opt/copied.txt"

[[commands]]
script_path = "/scripts/setup.sh"
env = { STAGE = "one" }

[[commands]]
command = "mkdir -p /from-command"

[[commands]]
script_inline = "#!/bin/sh\\nid > /out/inline-id\\npwd > /out/inline-pwd\\n"

[[overlays]]
source = "/files/motd"
destination = "/etc/motd"

[[overlays]]
source = "/tree"
destination = "/opt/tree"
is_directory = true

# /bin/busybox: in the image whatever the [export] cases keep
[[outputs]]
path = "/bin/busybox"
to = "busybox.out"
"""

# Everything a command's container can show ends up in the image, so a field that changes the
# container changes the image.
SETUP = """\
#!/bin/sh
set -e
mkdir -p /out
chmod 1777 /out
echo "$GREETING $STAGE" > /out/env
id > /out/id
pwd > /out/pwd
hostname > /out/hostname
for f in /mnt/vol*/*; do stat -c '%n %a %s' "$f"; done > /out/vol
cat /mnt/vol*/* > /out/vol-content
grep Cap /proc/self/status > /out/caps
ls /sys/class/net > /out/net
cat /etc/motd > /out/motd-seen 2>/dev/null || true
for f in /opt/copied*; do stat -c '%n %u %g %a' "$f"; cat "$f"; done > /out/copied
for f in /opt/copied*; do echo changed by a command >> "$f"; done
"""


def write_base(root: Path) -> Path:
    """The package every case starts from."""
    files = {
        "build.toml": BUILD,
        "scripts/setup.sh": SETUP,
        "scripts/other.sh": SETUP + "\n# x\n",
        "files/motd": "hello from the package\n",
        "files/motd2": "another motd\n",
        "files/copied.txt": "copied in\n",
        "tree/a.txt": "a\n",
        "tree/sub/b.txt": "b\n",
        "vol/input": "volume\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "scripts" / "setup.sh").chmod(0o755)
    os.symlink("a.txt", root / "tree" / "link")
    return root


def edit(old: str, new: str) -> Callable[[Path], None]:
    """A case that replaces `old` by `new` in build.toml (which must contain it)."""

    def apply(pkg: Path) -> None:
        text = (pkg / "build.toml").read_text()
        assert old in text, old
        (pkg / "build.toml").write_text(text.replace(old, new, 1))

    return apply


def append(section_line: str, line: str) -> Callable[[Path], None]:
    """A case that adds `line` after the first `section_line` of build.toml."""
    return edit(section_line + "\n", f"{section_line}\n{line}\n")


@dataclass(frozen=True)
class Case:
    """Change one thing; `keyed=False`: no command may run again for it."""

    fields: tuple[str, ...]  # the schema fields (paths as in docs/reference.md) it covers
    change: Callable[[Path], None]
    keyed: bool = True
    needs: str = ""  # "podman", "archive", "v2", "alias", "digest": prepared by the test


def _chmod(rel: str, mode: int) -> Callable[[Path], None]:
    return lambda pkg: (pkg / rel).chmod(mode)


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def write(pkg: Path) -> None:
        (pkg / rel).write_text(text)

    return write


def _relink(rel: str, target: str) -> Callable[[Path], None]:
    def apply(pkg: Path) -> None:
        (pkg / rel).unlink()
        os.symlink(target, pkg / rel)

    return apply


def _link_to_file(pkg: Path) -> None:
    (pkg / "tree" / "link").unlink()
    (pkg / "tree" / "link").write_text("a file where the link was\n")


def _container_user(pkg: Path) -> None:
    """Commands run as 1000:1000 by default; the first (which needs root) says uid 0."""
    append("[container]", "uid = 1000\ngid = 1000")(pkg)
    edit('env = { STAGE = "one" }', 'env = { STAGE = "one" }\nuid = 0\ngid = 0')(pkg)
    edit('command = "mkdir -p /from-command"', 'command = "mkdir -p /tmp/from-command"')(pkg)


def _move_script(pkg: Path) -> None:
    (pkg / "scripts" / "setup.sh").rename(pkg / "scripts" / "moved.sh")
    edit('"/scripts/setup.sh"', '"/scripts/moved.sh"')(pkg)


DOCKERFILE = """\
FROM rfs-test/busybox:1 AS first
ARG FLAVOUR=plain
RUN echo "$FLAVOUR" > /etc/df-flavour
COPY context.txt /etc/df-context
FROM first
ENV DF_STAGE=second
RUN echo "$DF_STAGE" > /etc/df-stage
"""


IMAGE_BY_DIGEST = 'image = { name = "rfs-test/busybox", digest = "BUSYBOXID" }'


def _dockerfile(lines: str = "", where: str = "") -> Callable[[Path], None]:
    """A case that builds the base from a Dockerfile in `where` (its context) instead."""

    def apply(pkg: Path) -> None:
        context = pkg / where
        context.mkdir(parents=True, exist_ok=True)
        (context / "Dockerfile").write_text(DOCKERFILE)
        (context / "context.txt").write_text("from the context\n")
        (context / "ignored.txt").write_text("never sent\n")
        (context / ".dockerignore").write_text("ignored.txt\n")
        path = f"/{where}/Dockerfile" if where else "/Dockerfile"
        edit(
            'image = { name = "rfs-test/busybox", tag = "1" }',
            f'dockerfile = "{path}"\n{lines}',
        )(pkg)

    return apply


def _then(*changes: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(pkg: Path) -> None:
        for change in changes:
            change(pkg)

    return apply


CASES: dict[str, Case] = {
    # [filesystem]
    "type": Case(("filesystem", "filesystem.type"), append("[filesystem]", 'type = "Squashfs"')),
    "size": Case(("filesystem.size_mib",), edit("size_mib = 24", "size_mib = 28")),
    "block size": Case(
        ("filesystem.block_size_mib",), append("[filesystem]", "block_size_mib = 4")
    ),
    "dd block size": Case(
        ("filesystem.dd_block_size_mib",), append("[filesystem]", "dd_block_size_mib = 4")
    ),
    "dd args": Case(("filesystem.dd_args",), append("[filesystem]", 'dd_args = ["conv=sparse"]')),
    "mkfs args": Case(
        ("filesystem.mkfs_args",), append("[filesystem]", 'mkfs_args = ["-L", "rootfs"]')
    ),
    # [container]
    "engine": Case(
        ("container.engine",), edit('engine = "Docker"', 'engine = "Podman"'), needs="podman"
    ),
    "image tag": Case(
        ("container.image", "container.image.tag"),
        edit(
            'image = { name = "rfs-test/busybox", tag = "1" }',
            'image = { name = "rfs-test-tmp/busybox", tag = "V2TAG" }',
        ),
        needs="v2",
    ),
    "image name, same image": Case(
        ("container.image.name",),
        edit('name = "rfs-test/busybox"', 'name = "ALIAS"'),
        keyed=False,
        needs="alias",
    ),
    "archive": Case(
        ("container.archive",),
        edit('image = { name = "rfs-test/busybox", tag = "1" }', 'archive = "/images/base.tar"'),
        needs="archive",
    ),
    "image digest": Case(
        ("container.image.digest",),
        edit('image = { name = "rfs-test/busybox", tag = "1" }', IMAGE_BY_DIGEST),
        needs="digest",
    ),
    "dockerfile": Case(("container.dockerfile",), _dockerfile()),
    "dockerfile context": Case(("container.context",), _dockerfile('context = "/df"', "df")),
    "dockerfile build args": Case(
        ("container.build_args",), _dockerfile('build_args = { FLAVOUR = "salted" }')
    ),
    "dockerfile target": Case(("container.target",), _dockerfile('target = "first"')),
    "dockerfile context file content": Case(
        (), _then(_dockerfile(), _write("context.txt", "edited context\n"))
    ),
    # The base is amd64 busybox: asking for its own platform explicitly is keyed all the same
    # (builds for two platforms share no step); arm64 builds are in test_arm64.py.
    "platform": Case(("container.platform",), append("[container]", 'platform = "linux/amd64"')),
    "wait timeout": Case(
        ("container.wait_timeout_s",), append("[container]", "wait_timeout_s = 5"), keyed=False
    ),
    "connection uri": Case(
        ("container.connection_uri",),
        append("[container]", 'connection_uri = "unix:///run/docker.sock"'),
        keyed=False,
    ),
    "volume target": Case(("container.volumes",), edit('"/mnt/vol"', '"/mnt/vol2"')),
    "env": Case(("container", "container.env"), edit('GREETING = "hello"', 'GREETING = "bye"')),
    "hostname": Case(("container.hostname",), edit('hostname = "rfsbox"', 'hostname = "other"')),
    "oci runtime": Case(("container.oci_runtime",), append("[container]", 'oci_runtime = "runc"')),
    "timeout": Case(("container.timeout",), append("[container]", "timeout = 600"), keyed=False),
    "cap add": Case(("container.cap_add",), append("[container]", 'cap_add = ["NET_ADMIN"]')),
    "cap drop": Case(("container.cap_drop",), append("[container]", 'cap_drop = ["CHOWN"]')),
    "container uid": Case(("container.uid", "container.gid"), _container_user),
    "container working dir": Case(
        ("container.working_dir",), append("[container]", 'working_dir = "/tmp"')
    ),
    # [[copy]]
    "copy source": Case(("copy", "copy[].source"), edit('"/files/copied.txt"', '"/files/motd2"')),
    "copy destination": Case(
        ("copy[].destination",), edit('"/opt/copied.txt"', '"/opt/copied-elsewhere.txt"')
    ),
    "copy mode": Case(("copy[].mode",), append('destination = "/opt/copied.txt"', "mode = 0o600")),
    "copy uid": Case(("copy[].uid",), append('destination = "/opt/copied.txt"', "uid = 1000")),
    "copy gid": Case(("copy[].gid",), append('destination = "/opt/copied.txt"', "gid = 1000")),
    # [[outputs]]: the side outputs are compared too
    "output path": Case(
        ("outputs", "outputs[].path"), edit('path = "/bin/busybox"', 'path = "/out/env"')
    ),
    "output to": Case(("outputs[].to",), edit('to = "busybox.out"', 'to = "side/busybox"')),
    "output remove": Case(("outputs[].remove",), append('to = "busybox.out"', "remove = true")),
    "filesystem all root": Case(
        ("filesystem.all_root",), append("[filesystem]", 'type = "Squashfs"\nall_root = true')
    ),
    # [[commands]]
    "command": Case(
        ("commands", "commands[].command"),
        edit('"mkdir -p /from-command"', '"mkdir -p /from-command-2"'),
    ),
    "script inline": Case(("commands[].script_inline",), edit("pwd > /out/inline-pwd", "pwd")),
    "script path": Case(
        ("commands[].script_path",), edit('"/scripts/setup.sh"', '"/scripts/other.sh"')
    ),
    "script moved": Case(("commands[].script_path",), _move_script, keyed=False),
    "uid": Case(
        ("commands[].uid",),
        edit("[[commands]]\nscript_inline", "[[commands]]\nuid = 1000\nscript_inline"),
    ),
    "gid": Case(
        ("commands[].gid",),
        edit("[[commands]]\nscript_inline", "[[commands]]\ngid = 1000\nscript_inline"),
    ),
    "working dir": Case(
        ("commands[].working_dir",),
        edit("[[commands]]\nscript_inline", '[[commands]]\nworking_dir = "/tmp"\nscript_inline'),
    ),
    "command env": Case(("commands[].env",), edit('STAGE = "one"', 'STAGE = "two"')),
    "max age": Case(
        ("commands[].max_age",),
        edit('"mkdir -p /from-command"', '"mkdir -p /from-command"\nmax_age = "7d"'),
        keyed=False,
    ),
    "no cache": Case(
        ("commands[].no_cache",),
        edit('"mkdir -p /from-command"', '"mkdir -p /from-command"\nno_cache = true'),
    ),
    # [[overlays]]
    "overlay source": Case(
        ("overlays", "overlays[].source"), edit('"/files/motd"', '"/files/motd2"')
    ),
    "overlay inline": Case(
        ("overlays[].source_inline",),
        edit('source = "/files/motd"', 'source_inline = "inline motd\\n"'),
    ),
    "overlay destination": Case(("overlays[].destination",), edit('"/etc/motd"', '"/etc/motd2"')),
    "overlay is_directory": Case(
        ("overlays[].is_directory",),
        edit(
            'source = "/tree"\ndestination = "/opt/tree"\nis_directory = true',
            'source = "/tree/a.txt"\ndestination = "/opt/tree"',
        ),
    ),
    "overlay mounted": Case(
        ("overlays[].mounted",),
        edit('destination = "/etc/motd"', 'destination = "/etc/motd"\nmounted = true'),
    ),
    "overlay mode": Case(
        ("overlays[].mode",),
        edit('destination = "/etc/motd"', 'destination = "/etc/motd"\nmode = 0o600'),
    ),
    "overlay uid": Case(
        ("overlays[].uid",),
        edit('destination = "/opt/tree"', 'destination = "/opt/tree"\nuid = 1000'),
    ),
    "overlay gid": Case(
        ("overlays[].gid",),
        edit('destination = "/opt/tree"', 'destination = "/opt/tree"\ngid = 1000'),
    ),
    # [export]
    "exclude a file": Case(
        ("export", "export.files", "export.files.exclude"),
        lambda p: _add(p, '[export.files]\nexclude = ["/out/id"]\n'),
    ),
    "include files": Case(
        ("export.files.include",), lambda p: _add(p, '[export.files]\ninclude = ["/bin/busybox"]\n')
    ),
    "create a file": Case(
        ("export.files.create",),
        lambda p: _add(p, '[export.files]\ncreate = ["/etc/machine-id"]\n'),
    ),
    "include directories": Case(
        ("export.directories", "export.directories.include"),
        lambda p: _add(p, '[export.directories]\ninclude = ["/bin", "/etc", "/out", "/opt"]\n'),
    ),
    "create a directory": Case(
        ("export.directories.create",),
        lambda p: _add(p, '[export.directories]\ncreate = ["/srv/new"]\n'),
    ),
    "exclude a directory": Case(
        ("export.directories.exclude",),
        lambda p: _add(p, '[export.directories]\nexclude = ["/out"]\n'),
    ),
    # package files: content, the mode bits that reach the image, kind, symlink target
    "overlay file content": Case((), _write("files/motd", "edited\n")),
    "overlay file made executable": Case((), _chmod("files/motd", 0o744)),
    "overlay file group-executable": Case((), _chmod("files/motd", 0o654), keyed=False),
    "tree file content": Case((), _write("tree/sub/b.txt", "B\n")),
    "tree file made executable": Case((), _chmod("tree/a.txt", 0o700)),
    "tree file added": Case((), _write("tree/sub/c.txt", "c\n")),
    "tree symlink target": Case((), _relink("tree/link", "sub/b.txt")),
    "tree symlink becomes a file": Case((), _link_to_file),
    "volume file content": Case((), _write("vol/input", "other volume\n")),
    "copied file content": Case((), _write("files/copied.txt", "copied, edited\n")),
    "copied file made executable": Case((), _chmod("files/copied.txt", 0o755)),
    "volume file made executable": Case((), _chmod("vol/input", 0o755)),
    "script content": Case((), _write("scripts/setup.sh", SETUP + "echo more > /out/more\n")),
}
# Fields that cannot be shown on this host, with the reason; each still has its key tested in
# tests/unit (test_graph.py).
CANNOT_RUN_HERE = {
    "container.rootful": "this host refuses privileged containers (runc: unable to apply caps)",
    "commands[].privileged": "this host refuses privileged containers (runc: unable to apply caps)",
}


def _add(pkg: Path, text: str) -> None:
    with (pkg / "build.toml").open("a") as f:
        f.write("\n" + text)


def schema_fields() -> set[str]:
    """Every field path of the schema, from its own table of keys."""
    sections = {
        "filesystem": "filesystem",
        "container": "container",
        "container.image": "image",
        "commands[]": "commands",
        "overlays[]": "overlays",
        "export": "export",
        "copy[]": "copy",
        "outputs[]": "outputs",
    }
    fields = set(_KEYS[""])
    for prefix, table in sections.items():
        fields |= {f"{prefix}.{k}" for k in _KEYS[table]}
    fields |= {f"export.{part}.{k}" for part in _KEYS["export"] for k in _KEYS["pathset"]}
    return fields


def test_every_field_has_a_case() -> None:
    covered = {f for case in CASES.values() for f in case.fields} | set(CANNOT_RUN_HERE)
    missing = sorted(schema_fields() - covered)
    assert not missing, f"schema fields without a differential case: {missing}"
    unknown = sorted(covered - schema_fields())
    assert not unknown, f"cases name fields the schema does not have: {unknown}"


def test_the_case_list_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = dict(_KEYS)
    keys["overlays"] = (*keys["overlays"], "brand_new")
    monkeypatch.setitem(globals(), "_KEYS", keys)
    with pytest.raises(AssertionError, match="brand_new"):
        test_every_field_has_a_case()


# --- the differential build ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(
    docker_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A warm cache holding the base package's build, and what the cases need."""
    import docker

    root = tmp_path_factory.mktemp("truth")
    base = write_base(root / "base")
    warm = root / "warm-cache"
    built = rfs("build", base, "-o", root / "base.ext4", "--no-network", cache=warm)
    assert built.code == 0, built.err
    image = docker_client.images.get(BUSYBOX)
    alias = f"rfs-test-tmp/truth-alias-{uuid.uuid4().hex[:8]}"
    v2tag = f"truth-v2-{uuid.uuid4().hex[:8]}"  # unique: other test runs share the engine
    image.tag(alias, "1")
    container = docker_client.containers.create(
        BUSYBOX, command=["/bin/true"], labels={"org.rfs.test": "1"}
    )
    try:
        import io
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("etc/truth-v2")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"v2\n"))
        container.put_archive("/", buf.getvalue())
        container.commit("rfs-test-tmp/busybox", v2tag)
    finally:
        container.remove(force=True)
    archive = root / "base.tar"
    with archive.open("wb") as f:
        for chunk in image.save(named=False):
            f.write(chunk)
    yield {
        "root": root,
        "base": base,
        "warm": warm,
        "alias": alias,
        "archive": archive,
        "v2tag": v2tag,
        "busybox_id": image.id,
    }
    for tag in (f"{alias}:1", f"rfs-test-tmp/busybox:{v2tag}"):
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(tag)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_warm_build_gives_what_a_clean_build_gives(
    name: str, prepared: dict[str, Any], tmp_path: Path
) -> None:
    case = CASES[name]
    pkg = tmp_path / "pkg"
    shutil.copytree(prepared["base"], pkg, symlinks=True)
    if case.needs == "podman":
        podman_ready()
    if case.needs == "archive":
        (pkg / "images").mkdir()
        shutil.copy(prepared["archive"], pkg / "images" / "base.tar")
    case.change(pkg)
    if case.needs == "digest":
        text = (pkg / "build.toml").read_text().replace("BUSYBOXID", prepared["busybox_id"])
        (pkg / "build.toml").write_text(text)
    if case.needs in ("alias", "v2"):
        text = (pkg / "build.toml").read_text().replace("ALIAS", prepared["alias"])
        (pkg / "build.toml").write_text(text.replace("V2TAG", prepared["v2tag"]))

    # The warm build writes over the base package's image, freshly rebuilt: a change missing
    # from the keys would find that image cached and keep it.
    warm_out, clean_out = prepared["root"] / "shared.img", tmp_path / "clean.img"
    again = rfs("build", prepared["base"], "-o", warm_out, "--no-network", cache=prepared["warm"])
    assert again.code == 0, again.err
    plan = rfs("plan", pkg, "-o", warm_out, "--no-network", cache=prepared["warm"])
    assert plan.code == 0, plan.err
    if not case.keyed:
        assert not steps_run(plan.out), f"{name} must not make any step run again:\n{plan.out}"
    warm = rfs("build", pkg, "-o", warm_out, "--no-network", cache=prepared["warm"])
    assert warm.code == 0, warm.err
    clean = rfs("build", pkg, "-o", clean_out, "--no-network", cache=tmp_path / "empty-cache")
    assert clean.code == 0, clean.err
    if warm_out.read_bytes() != clean_out.read_bytes():
        detail = ""
        if (pkg / "build.toml").read_text().count("Squashfs") == 0:
            a, b = list_ext4(warm_out), list_ext4(clean_out)
            detail = "\n".join(
                f"{p}: {a.get(p)} != {b.get(p)}"
                for p in sorted(set(a) | set(b))
                if a.get(p) != b.get(p)
            )[:3000]
        pytest.fail(f"{name}: the warm build's image differs from a clean build's\n{detail}")
    for out in tomllib.loads((pkg / "build.toml").read_text()).get("outputs", []):
        to = out.get("to") or out["path"].rsplit("/", 1)[-1]
        assert (warm_out.parent / to).read_bytes() == (clean_out.parent / to).read_bytes(), (
            f"{name}: the side output {to} of the warm build differs from a clean build's"
        )


def test_a_retagged_from_image_gives_what_a_clean_build_gives(
    prepared: dict[str, Any], docker_client: Any, tmp_path: Path
) -> None:
    """The image a Dockerfile's FROM names is re-tagged to another image (rebuilt, pulled
    anew): the warm build must build the base again on it, as a clean build does, and
    `--explain` names the FROM image."""
    import docker

    name = f"rfs-test-tmp/truth-from-{uuid.uuid4().hex[:8]}"  # unique: runs share the engine
    docker_client.images.get(BUSYBOX).tag(name, "1")
    try:
        pkg = tmp_path / "pkg"
        shutil.copytree(prepared["base"], pkg, symlinks=True)
        _dockerfile()(pkg)
        dockerfile = pkg / "Dockerfile"
        dockerfile.write_text(dockerfile.read_text().replace("rfs-test/busybox:1", f"{name}:1"))
        warm_out, clean_out = tmp_path / "warm.img", tmp_path / "clean.img"
        first = rfs("build", pkg, "-o", warm_out, "--no-network", cache=prepared["warm"])
        assert first.code == 0, first.err
        assert "/etc/truth-v2" not in list_ext4(warm_out)

        docker_client.images.get(f"rfs-test-tmp/busybox:{prepared['v2tag']}").tag(name, "1")
        explained = rfs(
            "plan", pkg, "-o", warm_out, "--no-network", "--explain", cache=prepared["warm"]
        )
        assert explained.code == 0, explained.err
        assert f"FROM image {name}:1 is another image now" in explained.out, explained.out
        warm = rfs("build", pkg, "-o", warm_out, "--no-network", cache=prepared["warm"])
        assert warm.code == 0, warm.err
        clean = rfs("build", pkg, "-o", clean_out, "--no-network", cache=tmp_path / "empty")
        assert clean.code == 0, clean.err
        assert "/etc/truth-v2" in list_ext4(warm_out)
        assert warm_out.read_bytes() == clean_out.read_bytes()
    finally:
        cleared = rfs("cache", "clear", cache=tmp_path / "empty")  # its bases' and layers' tags
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(f"{name}:1")
    assert cleared.code == 0, cleared.err
