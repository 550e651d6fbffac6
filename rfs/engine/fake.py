"""An engine in memory, for testing the build pipeline without Docker or Podman.

In the spirit of httpx's `MockTransport`: `FakeEngine` satisfies the same `Engine` protocol as
the real adapter, keeps images as layers of file trees, and runs a Python callable in place of
each command. Planning, executing, caching, interrupts, faults and remote sync can then be
tested end to end in milliseconds; `tests/integration/test_engine_contract.py` runs the same
cases against it and the real engines, so the two keep agreeing.

    def run(ctx: FakeRun) -> int:
        if ctx.argv[:1] == ("touch",):
            ctx.write(ctx.argv[1], b"")
        return 0

    engine = FakeEngine(run)
    engine.add_image("busybox:1", {"/bin/sh": b"#!fake"})

Images are real in the ways rfs relies on: an image's ID is the sha256 of its config, which
lists the digest of every layer tarball; `export` streams a tar archive with its end marker;
`save_image`/`load_image` read and write `docker save` tarballs.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any, BinaryIO

from rfs.engine.base import EMPTY, MANAGED_LABEL, BinarySink, RunSpec
from rfs.engine.faketree import (
    Command,
    Entry,
    FakeRun,
    StoredImage,
    Tree,
    apply_layer,
    copy_into,
    diff_trees,
    env_of,
    layer_tar,
    make_parents,
    norm,
    sha256_hex,
    tar_of,
)
from rfs.errors import EngineError, EnvironmentProblem, StartFailed, StepFailed

__all__ = ["Entry", "FakeEngine", "FakeRun", "Tree"]

if TYPE_CHECKING:
    from rfs.engine.fakebuild import Stage
    from rfs.engine.layerdiff import Limit


class FakeEngine:
    """The `Engine` protocol in memory; `run` stands in for every command (default: exit 0).

    `calls` records each method called (for tests that count container starts), `kept` the
    containers a `keep_failed` run left, by ID with their labels.
    """

    def __init__(
        self,
        run: Command | None = None,
        *,
        name: str = "docker",
        version: str = "fake-1",
        platform: str = "linux/amd64",
    ) -> None:
        self.name = name
        self.local = True
        self.run = run or (lambda ctx: 0)
        self._version = version
        self._platform = platform
        self.images: dict[str, StoredImage] = {}
        self.tags: dict[str, str] = {}
        self.kept: dict[str, dict[str, str]] = {}
        self.calls: list[str] = []
        self.build_platforms: list[str | None] = []  # the platform each build asked for
        self.export_platforms: list[str | None] = []  # the platform each export asked for
        self.pull_platforms: list[str | None] = []  # the platform each --pull asked for
        self._containers = 0
        self._stopped: dict[str, tuple[Tree, int, int]] = {}  # during `on_exited`: files, size

    # -- test set-up -------------------------------------------------------------------------

    def add_image(self, tag: str, files: Mapping[str, bytes | Entry]) -> str:
        """Make a one-layer image of `files` tagged `tag`; return its ID."""
        tree: Tree = {}
        for path, value in files.items():
            entry = value if isinstance(value, Entry) else Entry("file", value, 0o755)
            make_parents(tree, norm(path))
            tree[norm(path)] = entry
        image_id = self._store([layer_tar(dict(tree))], tree, {})
        self.tags[tag] = image_id
        return image_id

    def tree(self, ref: str) -> Tree:
        """A copy of the files of image `ref`."""
        return dict(self._image(ref).tree)

    def _store(
        self, layers: list[bytes], tree: Tree, container_config: Mapping[str, object]
    ) -> str:
        os_name, _, arch = self._platform.partition("/")
        config = json.dumps(
            {
                "architecture": arch.split("/")[0],
                "os": os_name,
                "config": dict(container_config),
                "rootfs": {"type": "layers", "diff_ids": [sha256_hex(layer) for layer in layers]},
            },
            sort_keys=True,
        ).encode()
        image_id = sha256_hex(config)
        size = sum(len(e.data) for e in tree.values())
        self.images[image_id] = StoredImage(config, list(layers), dict(tree), size)
        return image_id

    def _resolve(self, ref: str) -> str | None:
        if ref in self.images:
            return ref
        if f"sha256:{ref}" in self.images:
            return f"sha256:{ref}"
        found = self.tags.get(ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest")
        return found

    def _image(self, ref: str) -> StoredImage:
        found = self._resolve(ref)
        if found is None:
            raise EngineError(f"the fake engine has no image {ref}")
        return self.images[found]

    # -- the Engine protocol -----------------------------------------------------------------

    def ping(self) -> None:
        """The fake always answers."""
        self.calls.append("ping")

    def version(self) -> str:
        """The version given at construction."""
        return self._version

    def image_id(self, ref: str) -> str | None:
        """The ID of `ref`, or None."""
        return self._resolve(ref)

    def image_size(self, ref: str) -> int | None:
        """The bytes of the files of `ref`."""
        found = self._resolve(ref)
        return None if found is None else self.images[found].size or None

    def image_platform(self, ref: str) -> str:
        """The platform given at construction."""
        return self._platform if self._resolve(ref) is not None else ""

    def resolve_base(
        self, name: str, tag: str, *, pull: bool = False, platform: str | None = None
    ) -> str:
        """The local image `name:tag`; there is no registry to pull from (a --pull fails, its
        `platform` recorded in `pull_platforms`)."""
        self.calls.append("resolve_base")
        if pull:
            self.pull_platforms.append(platform)
            raise EnvironmentProblem(
                f"--pull: cannot look up base image {name}:{tag} in its "
                "registry: the fake engine has none",
                hint="build without --pull to use the image the engine has",
            )
        found = self._resolve(f"{name}:{tag}")
        if found is None:
            raise EnvironmentProblem(
                f"base image {name}:{tag} is not present locally and "
                "could not be pulled: the fake engine has no registry"
            )
        return found

    def check_base(self, name: str, tag: str, platform: str | None = None) -> None:
        """Refuse a base image the fake does not have."""
        self.resolve_base(name, tag)

    def check_runtime(self, runtime: str) -> None:
        """Every runtime is accepted."""

    def import_archive(self, path: str, *, image: bool) -> str:
        """Load a `docker save` tarball, or import a root filesystem tarball as one layer."""
        with open(path, "rb") as f:
            if image:
                return self.load_image(f)[0]
            layer = f.read()
        if layer[:2] == b"\x1f\x8b":
            import gzip

            layer = gzip.decompress(layer)
        tree: Tree = {}
        apply_layer(tree, layer)
        return self._store([layer], tree, {})

    def has_tag(self, tag: str) -> bool:
        """Whether `tag` names an image."""
        return tag in self.tags

    def build_image(
        self,
        context: BinaryIO,
        *,
        dockerfile: str,
        tag: str,
        step: str,
        build_args: Mapping[str, str] = EMPTY,
        target: str | None = None,
        on_output: Callable[[bytes], None] | None = None,
        no_cache: bool = False,
        platform: str | None = None,
    ) -> str:
        """Build the Dockerfile subset of `rfs.engine.fakebuild` from the context tar (the
        fake keeps no build cache: `no_cache` changes nothing; it has one platform, so
        `platform` is only recorded in `build_platforms`)."""
        from rfs.engine.fakebuild import DockerfileError, parse

        self.calls.append("build")
        self.build_platforms.append(platform)
        ctx: Tree = {}
        apply_layer(ctx, context.read())
        if norm(dockerfile) not in ctx:
            raise StepFailed(step, f"the context holds no Dockerfile {dockerfile}")
        built: dict[str, tuple[Tree, dict[str, object], list[bytes]]] = {}
        try:
            stages = parse(ctx[norm(dockerfile)].data.decode(), build_args, target)
            for index, stage in enumerate(stages):
                result = self._build_stage(stage, built, ctx, on_output)
                built[str(index)] = result
                if stage.name:
                    built[stage.name] = result
        except DockerfileError as exc:
            raise StepFailed(
                step, f"the fake build of {dockerfile} failed at `{exc.line}`: {exc}"
            ) from exc
        tree, config, layers = built[str(len(stages) - 1)]
        image_id = self._store(layers, tree, config)
        self.tag(image_id, tag)
        return image_id

    def _build_stage(
        self,
        stage: Stage,
        built: Mapping[str, tuple[Tree, dict[str, object], list[bytes]]],
        ctx: Tree,
        on_output: Callable[[bytes], None] | None,
    ) -> tuple[Tree, dict[str, object], list[bytes]]:
        from rfs.engine.fakebuild import DockerfileError

        if stage.base in built:
            base_tree, config, layers = built[stage.base]
        else:
            found = self._resolve(stage.base)
            if found is None:
                raise DockerfileError(f"FROM {stage.base}", f"no image {stage.base} (no pulling)")
            image = self.images[found]
            base_tree, layers = image.tree, list(image.layers)
            config = dict(json.loads(image.config).get("config", {}))
        tree, config = dict(base_tree), dict(config)
        env = env_of(config.get("Env"))
        for ins in stage.instructions:
            if ins.op == "ENV":
                env.update(env_of(ins.args))
            elif ins.op == "WORKDIR":
                where = norm(posixpath.join(str(config.get("WorkingDir") or "/"), ins.args[0]))
                make_parents(tree, where)
                tree.setdefault(where, Entry("dir", mode=0o755))
                config["WorkingDir"] = where
            elif ins.op == "USER":
                config["User"] = ins.args[0]
            elif ins.op == "COPY":
                copy_into(tree, ins.args, ctx, built, ins.line)
            else:  # RUN
                spec = RunSpec(
                    image=stage.base,
                    argv=("/bin/sh", "-c", ins.args[0]),
                    env={**env, **env_of(ins.args[1:])},
                )
                run = FakeRun(spec, tree)
                code = self.run(run)
                for chunk in run.output:
                    if on_output is not None:
                        on_output(chunk)
                if code != 0:
                    raise DockerfileError(ins.line, f"exited with code {code}")
        config["Env"] = [f"{k}={v}" for k, v in env.items()]
        return tree, config, [*layers, layer_tar(diff_trees(base_tree, tree))]

    def run_and_commit(
        self,
        spec: RunSpec,
        *,
        step: str,
        tag: str,
        on_output: Callable[[bytes], None],
        keep_failed: bool = False,
        on_exited: Callable[[str], Future[Any] | None] | None = None,
    ) -> str:
        """Run the stand-in on a copy of `spec.image`'s files and commit what it changed;
        `on_exited` may read the container (`export_container`) until its future ends."""
        self.calls.append("run")
        parent = self._image(spec.image)
        self._containers += 1
        container = f"{self._containers:064x}"
        ctx = FakeRun(spec, dict(parent.tree))
        try:
            code = self.run(ctx)
        except OSError as exc:  # what a stand-in cannot do, the real command could not either
            raise StartFailed(step, str(exc)) from exc
        finally:
            for chunk in ctx.output:
                on_output(chunk)
        if code != 0:
            kept = None
            if keep_failed:
                self.kept[container] = {MANAGED_LABEL: "1", **spec.labels}
                kept = container
            tail = b"".join(ctx.output).decode("utf-8", "replace")[-2000:]
            raise StepFailed(step, f"exited with code {code}", tail, kept)
        changed = diff_trees(parent.tree, ctx.files)
        layer = layer_tar(changed)
        if on_exited is not None:
            data = sum(len(e.data) for e in changed.values() if e is not None and e.kind == "file")
            self._stopped[container] = (dict(ctx.files), len(changed), data)
            if (reading := on_exited(container)) is not None:
                wait([reading])
            del self._stopped[container]
        config = json.loads(parent.config).get("config", {})
        image_id = self._store([*parent.layers, layer], ctx.files, config)
        self.tag(image_id, tag)
        return image_id

    def export_container(
        self, cid: str, dest: BinarySink, *, on_progress: Callable[[int], None] | None = None
    ) -> None:
        """The files of a stopped container (one whose `on_exited` runs) as one tarball."""
        self.calls.append("export_container")
        if cid not in self._stopped:
            raise EngineError(f"no such container: {cid[:12]}")
        _send(layer_tar(self._stopped[cid][0]), dest, on_progress)

    def exports_as_committed(self, cid: str, over: Limit | None) -> bool:
        """By the entries and file bytes the stopped container's change holds (the fake has
        no init layer: its containers always export as their images)."""
        _, entries, size = self._stopped.get(cid, ({}, -1, -1))
        return entries >= 0 and (over is None or entries > over.entries or size > over.data_bytes)

    def probe_start(
        self,
        image: str,
        argv: Sequence[str],
        *,
        privileged: bool,
        labels: Mapping[str, str] = EMPTY,
    ) -> str | None:
        """Every container starts."""
        self.calls.append("probe")
        return None

    def export(
        self,
        image: str,
        dest: BinarySink,
        *,
        labels: Mapping[str, str] = EMPTY,
        on_progress: Callable[[int], None] | None = None,
        platform: str | None = None,
    ) -> None:
        """Stream the files of `image` as one tarball, with tar's end-of-archive marker (the
        fake has one platform: `platform` is only recorded in `export_platforms`)."""
        self.calls.append("export")
        self.export_platforms.append(platform)
        _send(layer_tar(dict(self._image(image).tree)), dest, on_progress)

    def image_layers(self, ref: str) -> list[str]:
        """The digests of `ref`'s layer tarballs, base first."""
        return [sha256_hex(layer) for layer in self._image(ref).layers]

    def layer_diff(self, image: str, dest: BinaryIO, limit: Limit, *, new_layer: bool) -> bool:
        """The top layer of `image`, normalised as the real adapter gives it."""
        from rfs.engine.layerdiff import TooLarge, normalise_layer

        self.calls.append("layer_diff")
        layers = self._image(image).layers
        start = dest.tell()
        try:
            normalise_layer(io.BytesIO(layers[-1] if new_layer else layer_tar({})), dest, limit)
        except TooLarge:
            dest.seek(start)
            dest.truncate()
            return False
        return True

    def save_image(self, ref: str, dest: BinarySink) -> None:
        """A `docker save` tarball of `ref`: manifest, config, one tarball per layer."""
        found = self._image(ref)
        image_id = self._resolve(ref)
        assert image_id is not None
        members = {f"{image_id[7:]}.json": found.config}
        names = [f"{sha256_hex(layer)[7:]}/layer.tar" for layer in found.layers]
        members.update(zip(names, found.layers, strict=True))
        tags = [t for t, i in self.tags.items() if i == image_id]
        members["manifest.json"] = json.dumps(
            [{"Config": f"{image_id[7:]}.json", "RepoTags": tags, "Layers": names}]
        ).encode()
        dest.write(tar_of(members))

    def load_image(self, source: BinaryIO) -> list[str]:
        """Load a `docker save` tarball; its layers must match the config's diff_ids."""
        with tarfile.open(fileobj=source, mode="r:") as tar:
            members = {}
            for info in tar:
                f = tar.extractfile(info) if info.isfile() else None
                if f is not None:
                    members[info.name] = f.read()
        try:
            (manifest,) = json.loads(members["manifest.json"])
            config = members[manifest["Config"]]
            layers = [members[name] for name in manifest["Layers"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise EngineError(f"the fake engine could not load an image tarball: {exc}") from exc
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        if [sha256_hex(layer) for layer in layers] != diff_ids:
            raise EngineError(
                "the fake engine could not load an image tarball: a layer does "
                "not match its diff_id"
            )
        tree: Tree = {}
        for layer in layers:
            apply_layer(tree, layer)
        image_id = sha256_hex(config)
        self.images[image_id] = StoredImage(
            config, layers, tree, sum(len(e.data) for e in tree.values())
        )
        loaded = []
        for tag in manifest.get("RepoTags") or ():
            self.tags[str(tag)] = image_id
            loaded.append(str(tag))
        return loaded or [image_id]

    def tag(self, image_id: str, tag: str) -> None:
        """Point `tag` at `image_id`."""
        found = self._resolve(image_id)
        if found is None:
            raise EngineError(f"the fake engine has no image {image_id}")
        self.tags[tag] = found

    def remove_image(self, ref: str) -> None:
        """Untag `ref` (an image with no tag left is dropped); a missing one is fine."""
        if ref in self.tags:
            image_id = self.tags.pop(ref)
            if image_id not in self.tags.values():
                self.images.pop(image_id, None)
        else:
            found = self._resolve(ref)
            if found is not None:
                self.images.pop(found, None)
                for tag in [t for t, i in self.tags.items() if i == found]:
                    del self.tags[tag]

    def container_labels(self, label: str) -> dict[str, dict[str, str]]:
        """The kept containers carrying `label`."""
        return {cid: labels for cid, labels in self.kept.items() if _matches(labels, label)}

    def settle(self) -> None:
        """Nothing to wait for: the fake removes its containers at once."""

    def remove_containers(self, label: str, *, keep: Collection[str] = ()) -> int:
        """Remove the kept containers carrying `label`, but those in `keep`."""
        gone = [
            cid for cid, labels in self.kept.items() if _matches(labels, label) and cid not in keep
        ]
        for cid in gone:
            del self.kept[cid]
        return len(gone)


def _matches(labels: Mapping[str, str], label: str) -> bool:
    key, sep, value = label.partition("=")
    return key in labels and (not sep or labels[key] == value)


if TYPE_CHECKING:
    from rfs.engine.base import Engine

    def _is_an_engine(fake: FakeEngine) -> Engine:
        """mypy checks here that FakeEngine satisfies the protocol the real adapter does."""
        return fake


def _send(data: bytes, dest: BinarySink, on_progress: Callable[[int], None] | None) -> None:
    dest.write(data)
    if on_progress is not None:
        on_progress(len(data))
