"""The one place that wires steps to the container engine, the store and the filesystem tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.errors import EnvironmentProblem, StartFailed
from rfs.graph.steps import Step, StepKind
from rfs.run import etcfiles
from rfs.run.baseimages import BaseImages, file_identity
from rfs.run.store import Blob, Store
from rfs.script.model import BuildScript, Command, Overlay
from rfs.script.package import resolve_reference

if TYPE_CHECKING:
    from concurrent.futures import Future

    from rfs.engine.base import CopySource, Engine, Mount
    from rfs.fs.overlay import OverlayEntry
    from rfs.fs.selection import Selection
    from rfs.report.reporter import Reporter
    from rfs.run.earlyexport import EarlyExports
    from rfs.run.snapshot import PackageSnapshot

LAYER_REPO = "rfs/layer"
# Per-step scratch directories under $TMPDIR: rfs-step-<pid>-<random>.
SCRATCH_PREFIX = "rfs-step-"
# Where rfs bind-mounts the files a command needs (its script). The export filter drops it.
SCRIPT_DIR = "/.rfs"


def layer_tag(key: str, cache_id: str) -> str:
    """The engine tag of the layer image committed for a RUN step by the cache `cache_id`
    (`Store.cache_id`): each cache directory owns its tags."""
    return f"{LAYER_REPO}/{cache_id}:{key}"


def interpreter_argv(script: bytes, path: str) -> list[str]:
    """The argv that runs `script` stored at `path`: its #! line, else /bin/sh.

    Like the kernel, everything after the interpreter on the #! line is one argument.
    """
    first = script.split(b"\n", 1)[0]
    if first.startswith(b"#!"):
        parts = first[2:].decode("utf-8", "replace").strip().split(None, 1)
        if parts:
            return [*parts, path]
    return ["/bin/sh", path]


# Steps that need the container engine to run (assembly and overlays do not).
ENGINE_STEPS = frozenset({StepKind.BASE, StepKind.RUN, StepKind.EXPORT, StepKind.DIFF})


def output_identity(path: Path) -> dict[str, int] | None:
    """What identifies an output file we wrote: any change to it shows here."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


@dataclass
class Executor:
    """Runs the steps of one build of `script`."""

    script: BuildScript
    store: Store
    engine_factory: Any  # () -> Engine, so cached builds never connect
    reporter: Reporter
    output: Path
    source_date_epoch: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    network: bool = True
    keep_failed: bool = False  # keep a failed command's container (rfs build --keep-failed)
    # The build's copies of package files, checked against the digests the keys were made of.
    snapshot: PackageSnapshot | None = None
    no_cache: bool = False  # rfs build --no-cache: cached ext4 base images are not used either
    _engine: Engine | None = None
    # key -> identity (inode, size, mtime) of export blobs whose content hash was checked (or
    # written) during this build, so the planner's check is not repeated before assembly.
    _verified: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    _early: EarlyExports | None = None  # containers exported while committed (rfs.run.earlyexport)

    @property
    def engine(self) -> Engine:
        """The engine, connected on first use."""
        if self._engine is None:
            self._engine = self.engine_factory()
        return self._engine

    # availability, for the planner ---------------------------------------------------------

    def missing(self, step: Step) -> str | None:
        """None when `step`'s result is available, else why it is not."""
        if step.kind is StepKind.BASE:
            return None  # resolved (and pulled if needed) before planning
        record = self.store.record(step.key)
        if record is None:
            return "no cache entry"
        if step.kind is StepKind.RUN:
            if not self.engine.has_tag(self.layer_tag(step.key)):
                return f"layer image {self.layer_tag(step.key)[:41]}… is missing from the engine"
        elif step.kind in (StepKind.EXPORT, StepKind.DIFF):
            blob = self.store.blob(step.key)
            if blob is None:
                return "export tarball missing or truncated in the cache"
            # Rehashed here, when an assembly needs it, so a corrupt tarball is exported
            # again by this same build instead of failing it.
            if not self._verify(step.key, blob):
                return "the cached export tarball is corrupt (its content hash changed)"
        elif step.kind is StepKind.ASSEMBLE:
            outputs = record.get("outputs", {})
            recorded = outputs.get(str(self.output.resolve()))
            if recorded is None:
                return f"{self.output} was not built from these inputs"
            if recorded != output_identity(self.output):
                return f"{self.output} changed or disappeared since it was built"
            return self._side_outputs_missing(record)
        return None

    # running ----------------------------------------------------------------------------------

    def run(self, step: Step, parents: dict[str, Step], base_id: str) -> dict[str, Any]:
        """Run `step` and return its record (stored by the caller)."""
        if step.kind is StepKind.RUN:
            return self._run_command(step, parents, base_id)
        if step.kind is StepKind.EXPORT:
            return self._export(step, parents, base_id)
        if step.kind is StepKind.DIFF:
            from rfs.run.layerchain import run_diff

            return run_diff(self, step, parents, base_id)
        if step.kind is StepKind.OVERLAYS:
            return {"overlays": len(self.script.overlays)}
        if step.kind is StepKind.ASSEMBLE:
            return self._assemble(step, parents, base_id)
        return {"image_id": base_id}

    def verified(self, key: str, blob: Blob) -> bool:
        """Whether `blob` still has its recorded content hash (rehashed once per build)."""
        return self._verify(key, blob)

    def _verify(self, key: str, blob: Blob) -> bool:
        """Whether `blob` still has its recorded content hash (rehashed once per build)."""
        try:
            ident = file_identity(blob.path)
        except OSError:
            return False
        if self._verified.get(key) == ident:
            return True
        if not self.store.verify_blob(blob, key):
            return False
        self._verified[key] = ident
        return True

    def _image_of(self, parent: Step, base_id: str) -> str:
        return base_id if parent.kind is StepKind.BASE else self.layer_tag(parent.key)

    def layer_tag(self, key: str) -> str:
        """The tag of the layer image of RUN step `key` in this build's cache."""
        return layer_tag(key, self.store.cache_id)

    def _package_file(self, ref: str) -> Path:
        if self.snapshot is not None:
            return self.snapshot.path(ref)
        assert self.script.package_root is not None
        return resolve_reference(self.script.package_root, ref)

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        # The pid in the name lets a later build remove it if this process is killed.
        path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        try:
            path.chmod(0o755)  # commands may run as any uid
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _command_argv(self, cmd: Command, scratch: Path) -> list[str]:
        if cmd.command is not None:
            return cmd.command.split()  # buildfs's meaning: split on whitespace, no shell
        if cmd.script_inline is not None:
            body = cmd.script_inline.encode()
        else:
            assert cmd.script_path is not None
            body = self._package_file(cmd.script_path).read_bytes()
        (scratch / "run" / "script").write_bytes(body)
        (scratch / "run" / "script").chmod(0o755)
        return interpreter_argv(body, f"{SCRIPT_DIR}/script")

    def _mounts(self, scratch: Path, seeded: dict[str, bytes]) -> list[Mount]:
        from rfs.engine.base import Mount

        mounts = [Mount(str(scratch / "run"), SCRIPT_DIR, True)]
        for path, content in seeded.items():
            (scratch / etcfiles.scratch_name(path)).write_bytes(content)
            (scratch / etcfiles.scratch_name(path)).chmod(0o644)
            mounts.append(Mount(str(scratch / etcfiles.scratch_name(path)), path, False))
        for ref, target in self.script.container.volumes:
            mounts.append(Mount(str(self._package_file(ref)), target, True))
        for i, overlay in enumerate(self.script.overlays):
            if not overlay.mounted:
                continue
            if overlay.source is not None:
                source = self._package_file(overlay.source)
            else:
                source = scratch / f"overlay-{i}"
                source.write_text(overlay.source_inline or "")
            mounts.append(Mount(str(source), overlay.destination, True))
        return mounts

    def _run_command(self, step: Step, parents: dict[str, Step], base_id: str) -> dict[str, Any]:
        from rfs.engine.base import RunSpec

        assert step.index is not None
        cmd = self.script.commands[step.index]
        c = self.script.container
        parent = parents[step.parents[0]]
        uid, gid, working_dir = cmd.effective(c)
        user = None
        if uid is not None or gid is not None:
            user = f"{uid or 0}:{gid}" if gid is not None else str(uid)
        written = self._written(parent)
        seeded = etcfiles.seed(written, c.hostname) if self.engine.local else {}
        with self._scratch() as scratch:
            (scratch / "run").mkdir()
            (scratch / "run").chmod(0o755)  # commands may run as any uid
            spec = RunSpec(
                image=self._image_of(parent, base_id),
                argv=tuple(self._command_argv(cmd, scratch)),
                user=user,
                working_dir=working_dir,
                env={**dict(c.env), **dict(cmd.env)},
                privileged=cmd.privileged or c.rootful,
                mounts=tuple(self._mounts(scratch, seeded)),
                hostname=c.hostname,
                cap_add=c.cap_add,
                cap_drop=c.cap_drop,
                runtime=c.oci_runtime,
                timeout_s=float(c.timeout) if c.timeout else None,
                stop_timeout_s=c.wait_timeout_s if c.wait_timeout_s is not None else 10,
                network=self.network,
                labels=self.labels,
                copy_in=self._copy_in() if step.index == 0 else None,
                platform=c.platform,
            )
            try:
                image_id = self.engine.run_and_commit(
                    spec,
                    step=f"{step.id} ({step.label})",
                    tag=self.layer_tag(step.key),
                    on_output=lambda data: self.reporter.output(step, data),
                    keep_failed=self.keep_failed,
                    on_exited=self._export_early(step),
                )
            except StartFailed as exc:
                if spec.privileged:
                    self._refused_privilege(step, spec.image, exc)
                raise
            written = etcfiles.collect(scratch, seeded, written)
        record: dict[str, Any] = {
            "image_id": image_id,
            "tag": self.layer_tag(step.key),
            "etc_written": written,
        }
        # What a DIFF step reads: Docker commits a command that changed nothing without a layer.
        above = len(self.engine.image_layers(image_id))
        record["new_layer"] = above > len(self.engine.image_layers(spec.image))
        return record

    def _export_early(self, step: Step) -> Callable[[str], Future[Any] | None] | None:
        """What exports the container of RUN step `step` while it is committed, where a later
        step needs the whole export (rfs.run.earlyexport), else None."""
        from rfs.run.earlyexport import EarlyExports

        if self._early is None:
            self._early = EarlyExports(self.store, lambda: self.engine)
        return self._early.hook_for(self.script, step)

    def adopt_early_export(self, run_key: str, key: str) -> tuple[int, str] | None:
        """The export of RUN step `run_key`'s container, made while it was committed, as the
        blob of `key`: its size and content hash; None when there is none."""
        found = None if self._early is None else self._early.adopt(run_key, key)
        if found is not None:
            with contextlib.suppress(OSError):  # hashed on the way in
                self._verified[key] = file_identity(self.store.root / "blobs" / key)
        return found

    def settle(self) -> None:
        """Wait for the early exports still running; delete those no step took."""
        if self._early is not None:
            self._early.settle()

    def _copy_in(self) -> CopySource | None:
        """The `[[copy]]` entries, from the build's snapshot: what was keyed is what lands."""
        if not self.script.copies:
            return None
        from rfs.run.copyin import CopyIn

        return CopyIn(
            tuple((copy, self._package_file(copy.source)) for copy in self.script.copies),
            self.source_date_epoch,
        )

    def _refused_privilege(self, step: Step, image: str, failure: StartFailed) -> None:
        """Raise EnvironmentProblem (exit 3) when the privileged container of `step` could not
        start because the host refuses privilege, not because of the command."""
        from rfs.run.checks import privilege_message, privilege_refusal

        refusal = privilege_refusal(self.engine, image, self.labels)
        if refusal is None:
            return
        assert step.index is not None
        field = (
            "container.rootful"
            if self.script.container.rootful
            else f"commands[{step.index}].privileged"
        )
        raise EnvironmentProblem(
            f"{field}: {privilege_message(self.engine.name, refusal)}",
            hint=f"remove {field} if the commands do not need it, or build with an engine "
            "and host that allow privileged containers",
        ) from failure

    def _written(self, parent: Step) -> dict[str, bytes]:
        """What the commands up to `parent` wrote into the engine-managed /etc files."""
        if parent.kind is StepKind.BASE:
            return {}
        record = self.store.record(parent.key) or {}
        return dict(record.get("etc_written", {}))

    def _export(self, step: Step, parents: dict[str, Step], base_id: str) -> dict[str, Any]:
        parent = parents[step.parents[0]]
        image = self._image_of(parent, base_id)
        early = self.adopt_early_export(parent.key, step.key)
        size, digest = early or self.export_image(image, step.key, step)
        written = self._written(parents[step.parents[0]])
        return {"blob_size": size, "blob_digest": digest, "etc_written": written}

    def export_image(self, image: str, key: str, step: Step) -> tuple[int, str]:
        """Stream the export of `image` into the blob of `key` (progress shown on `step`);
        return its size and content hash."""
        from rfs.run.exporting import export_into

        size, digest = export_into(
            self.engine,
            self.store,
            image,
            key,
            self.labels,
            self.reporter,
            step,
            platform=self.script.container.platform,
        )
        with contextlib.suppress(OSError):  # the content hash was taken on the way in
            self._verified[key] = file_identity(self.store.root / "blobs" / key)
        return size, digest

    def _overlay_entries(self) -> list[OverlayEntry]:
        entries: list[OverlayEntry] = []
        for overlay in self.script.overlays:
            entries.extend(self._entries_for(overlay))
        return entries

    def _entries_for(self, overlay: Overlay) -> list[OverlayEntry]:
        from rfs.fs.overlay import OverlayEntry, overlay_entries_from_dir

        uid = overlay.uid or 0
        gid = overlay.gid or 0
        if overlay.source_inline is not None:
            content = overlay.source_inline.encode()
            mode = overlay.mode if overlay.mode is not None else 0o644
            return [OverlayEntry(overlay.destination, content, mode, uid, gid)]
        assert overlay.source is not None
        host = self._package_file(overlay.source)
        if overlay.is_directory:
            return overlay_entries_from_dir(
                host, overlay.destination, uid=uid, gid=gid, mode=overlay.mode
            )
        if overlay.mode is not None:
            mode = overlay.mode
        else:  # only the owner's "executable or not" is taken from the checkout
            from rfs.host.hashing import normalised_mode

            mode = normalised_mode(os.stat(host))
        return [OverlayEntry(overlay.destination, host.read_bytes(), mode, uid, gid)]

    def _side_outputs_missing(self, record: Mapping[str, Any]) -> str | None:
        """Why the side outputs of the image are not as rfs wrote them, or None."""
        from rfs.fs.outputs import identity

        recorded = record.get("side_outputs", {})
        for out in self.script.outputs:
            path = self.output.resolve().parent / out.to
            if str(path) not in recorded or recorded[str(path)] != identity(path):
                return f"side output {path} changed or disappeared since it was built"
        return None

    def selection(self, *, removals: bool = True) -> Selection:
        """The export selection of the build script, for the filesystem filter; `removals`:
        with the side outputs that `remove` leaves out of the image."""
        from rfs.fs.outputs import removal_globs
        from rfs.fs.selection import Selection

        removed = removal_globs([o.path for o in self.script.outputs if o.remove and removals])
        ex = self.script.export
        return Selection(
            whole=ex.whole,
            include_files=ex.files.include,
            include_dirs=ex.directories.include,
            create_files=ex.files.create,
            create_dirs=ex.directories.create,
            exclude=ex.files.exclude + ex.directories.exclude + removed,
        )

    def _assemble(self, step: Step, parents: dict[str, Step], base_id: str) -> dict[str, Any]:
        from rfs.fs.assemble import assemble
        from rfs.fs.image import Options

        fs = self.script.filesystem
        from rfs.run.layerchain import assembly_source

        made_of = assembly_source(self, step, parents, base_id)
        blob = made_of.blob
        restore = made_of.restore
        from rfs.host.childio import child_reads

        options = Options(
            seed=bytes.fromhex(step.key)[:32],
            source_date_epoch=self.source_date_epoch,
            size_mib=fs.size_mib,
            block_size_mib=fs.block_size_mib,
            mkfs_args=fs.mkfs_args,
            dd_args=fs.dd_args,
            all_root=fs.all_root,
            base_images=BaseImages(
                self.store,
                made_of.key,
                str(blob.digest),
                verify=self._verify,
                no_cache=self.no_cache,
                verified=self._verified,
            ),
        )
        overlays = self._overlay_entries()
        contents = None
        if self.script.outputs:  # read first: a missing side output fails before any write
            from rfs.fs import outputs as side

            contents = side.extract(
                blob.path,
                self.selection(removals=False),
                overlays,
                restore,
                [(f"outputs[{i}].path", o.path) for i, o in enumerate(self.script.outputs)],
            )
        # Progress: what the filesystem tool has read of the stream, against the export's size.
        with child_reads(None, lambda n: self.reporter.progress(step, n, blob.size)):
            result = assemble(
                fs.type,
                blob.path,
                self.selection(),
                overlays,
                self.output,
                options,
                restore=restore,
                warn=lambda text: self.reporter.message(f"rfs: warning: {text}"),
                layers=made_of.layers,
            )
        written = (
            {}
            if contents is None
            else side.write(
                self.output,
                [(f"outputs[{i}].to", o.to) for i, o in enumerate(self.script.outputs)],
                contents,
                {o.to: o.path for o in self.script.outputs},
            )
        )
        old = self.store.record(step.key) or {}
        outputs = dict(old.get("outputs", {}))
        outputs[str(self.output.resolve())] = output_identity(self.output)
        return {
            "outputs": outputs,
            "size_mib": result.size_mib,
            "route": result.route,
            "warnings": result.warnings,
            **({"side_outputs": written} if written else {}),
        }
