"""Compile a BuildScript into a DAG of content-addressed steps.

    base ─▶ run[0] ─▶ … ─▶ run[n-1] ─▶ export ─┐
                                              ├─▶ assemble
    overlays ─────────────────────────────────┘

Each key is blake3 over the canonical JSON of (key version, kind, own inputs, parents' keys),
so a change anywhere invalidates exactly the steps downstream of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rfs.graph.steps import KEY_VERSION, Facts, Step, StepKind
from rfs.host.hashing import digest_bytes, digest_json
from rfs.script.model import BuildScript, Command, Copy, Overlay

if TYPE_CHECKING:
    import networkx as nx


def _key(kind: StepKind, inputs: Mapping[str, Any], parent_keys: list[str]) -> str:
    return digest_json(
        {"v": KEY_VERSION, "kind": kind.value, "inputs": inputs, "parents": parent_keys}
    )


def describe_command(cmd: Command) -> str:
    """A short human description of a command, for plans and progress lines."""
    if cmd.command is not None:
        text = cmd.command.strip()
        return f"command: {text[:60]}{'…' if len(text) > 60 else ''}"
    if cmd.script_path is not None:
        return f"script {cmd.script_path}"
    lines = (cmd.script_inline or "").strip().splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.startswith("#!")), "")
    return f"inline script ({len(lines)} lines): {first.strip()[:50]}"


def command_inputs(
    cmd: Command, script: BuildScript, facts: Facts, index: int = -1
) -> dict[str, Any]:
    """The manifest of a RUN step: everything that can change the layer it produces."""
    c = script.container
    if cmd.command is not None:
        body: dict[str, Any] = {"argv": cmd.command.split()}
    elif cmd.script_inline is not None:
        body = {"script": digest_bytes(cmd.script_inline.encode())}
    else:  # by content alone: the script runs as /.rfs/script wherever the package keeps it
        assert cmd.script_path is not None
        body = {"script": facts.file_digests[cmd.script_path]}
    env = dict(c.env)
    env.update(dict(cmd.env))
    mounted = {
        o.destination: facts.file_digests[o.source]
        for o in script.overlays
        if o.mounted and o.source is not None
    }
    mounted.update(
        {
            o.destination: digest_bytes((o.source_inline or "").encode())
            for o in script.overlays
            if o.mounted and o.source_inline is not None
        }
    )
    # The values the command runs with, however they are spelled (its own or [container]'s).
    uid, gid, working_dir = cmd.effective(c)
    inputs: dict[str, Any] = {
        **body,
        "env": env,
        "uid": uid,
        "gid": gid,
        "working_dir": working_dir,
        "privileged": cmd.privileged or c.rootful,
        "hostname": c.hostname,
        "cap_add": sorted(c.cap_add),
        "cap_drop": sorted(c.cap_drop),
        "oci_runtime": c.oci_runtime,
        "engine": facts.engine,
        "network": facts.network,
        "volumes": {target: facts.file_digests[host] for host, target in c.volumes},
        "mounted_overlays": mounted,
        "code": facts.code.get("run", ""),
    }
    if index == 0 and script.copies:  # placed into this command's container before it starts
        inputs["copy"] = [copy_inputs(copy, facts) for copy in script.copies]
    return inputs


def copy_inputs(copy: Copy, facts: Facts) -> dict[str, Any]:
    """The manifest entry of one `[[copy]]`: what lands where, with which owner and mode."""
    return {
        "source": facts.file_digests[copy.source],
        "destination": copy.destination,
        "mode": copy.mode,
        "uid": copy.uid,
        "gid": copy.gid,
    }


def overlay_inputs(overlay: Overlay, facts: Facts) -> dict[str, Any]:
    """The manifest entry of one overlay: what lands where, with which owner and mode."""
    if overlay.source is not None:
        content = facts.file_digests[overlay.source]
    else:
        content = digest_bytes((overlay.source_inline or "").encode())
    return {
        "destination": overlay.destination,
        "content": content,
        "is_directory": overlay.is_directory,
        "mode": overlay.mode,
        "uid": overlay.uid,
        "gid": overlay.gid,
    }


def assemble_inputs(script: BuildScript, facts: Facts) -> dict[str, Any]:
    """The manifest of the ASSEMBLE step: filesystem settings, selection and tools."""
    fs = script.filesystem
    ex = script.export
    return {
        "type": fs.type.value,
        "size_mib": fs.size_mib,
        "block_size_mib": fs.block_size_mib,
        "dd_args": list(fs.dd_args),
        "mkfs_args": list(fs.mkfs_args),
        # Absent unless set, so the keys of scripts that do not use them stay as they were.
        **({"all_root": True} if fs.all_root else {}),
        **(
            {"outputs": [{"path": o.path, "to": o.to, "remove": o.remove} for o in script.outputs]}
            if script.outputs
            else {}
        ),
        "export": {
            "files": {
                "include": list(ex.files.include),
                "create": list(ex.files.create),
                "exclude": list(ex.files.exclude),
            },
            "directories": {
                "include": list(ex.directories.include),
                "create": list(ex.directories.create),
                "exclude": list(ex.directories.exclude),
            },
        },
        "mkfs": facts.mkfs_version,
        "code": facts.code.get("assemble", ""),
        "source_date_epoch": facts.source_date_epoch,
    }


def dockerfile_inputs(script: BuildScript, facts: Facts) -> dict[str, Any]:
    """What a `container.dockerfile` base is built from: the Dockerfile's content, every
    context entry the engine sees, the build args, the target, the images its FROM lines (and
    `COPY --from=<image>`) name, by the ID and platform the engine resolves them to, the engine
    and the rfs code that makes the context. Its digest names the built image
    (`dockerfile_tag_key`)."""
    c = script.container
    assert c.dockerfile is not None
    return {
        "dockerfile": facts.file_digests[c.dockerfile],
        "context": dict(facts.context),
        "build_args": dict(c.build_args),
        "target": c.target,
        **({"platform": c.platform} if c.platform is not None else {}),
        "from": {ref: dict(found) for ref, found in facts.from_images.items()},
        "engine": facts.engine,
        "code": facts.code.get("run", ""),
    }


def dockerfile_tag_key(script: BuildScript, facts: Facts) -> str:
    """The digest that tags the image a `container.dockerfile` base builds."""
    return digest_json({"v": KEY_VERSION, "dockerfile": dockerfile_inputs(script, facts)})


def compile_steps(script: BuildScript, facts: Facts) -> list[Step]:
    """The steps of `script` in dependency order, with their keys."""
    steps: list[Step] = []

    def add(
        step_id: str,
        kind: StepKind,
        label: str,
        inputs: dict[str, Any],
        parents: list[Step],
        index: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> Step:
        step = Step(
            step_id,
            kind,
            label,
            inputs,
            tuple(p.id for p in parents),
            _key(kind, inputs, [p.key for p in parents]),
            index,
            context or {},
        )
        steps.append(step)
        return step

    c = script.container
    # An archive is keyed by its content: importing a root filesystem tarball gives a new image
    # ID each time, and a `docker save` tarball's content fixes its image ID anyway.
    # A Dockerfile is keyed by what it is built from: two builds of it differ in their IDs.
    base_inputs: dict[str, Any] = (
        {"archive": facts.file_digests[c.archive]}
        if c.archive is not None
        else dockerfile_inputs(script, facts)
        if c.dockerfile is not None
        else {"image_id": facts.base_id}
    )
    if c.image is not None and c.image.digest is not None:
        base_inputs["digest"] = c.image.digest  # pinned: the key says which content
    # An image ID may name a multi-platform index: the platform it resolved to is keyed too.
    base_inputs["platform"] = facts.platform
    if c.platform is not None:  # asked for: commands run as it (absent otherwise, so the
        base_inputs["asked_platform"] = c.platform  # keys of other scripts stay as they were)
    last = add(
        "base",
        StepKind.BASE,
        f"base image {c.base_label}",
        base_inputs,
        [],
        context={"image": c.base_label},
    )
    export_inputs = {
        "engine": facts.engine,
        "engine_version": facts.engine_version,
        "code": facts.code.get("export", ""),
    }
    base = last
    diffs: list[Step] = []
    for i, cmd in enumerate(script.commands):
        last = add(
            f"run[{i}]",
            StepKind.RUN,
            f"commands[{i}] {describe_command(cmd)}",
            command_inputs(cmd, script, facts, i),
            [last],
            index=i,
        )
        if layered(script):
            diffs.append(
                add(
                    f"diff[{i}]",
                    StepKind.DIFF,
                    f"what commands[{i}] changed",
                    {**export_inputs, "code": facts.code.get("diff", "")},
                    [last, diffs[-1] if diffs else base],
                    index=i,
                )
            )
    exported = diffs or [
        add("export", StepKind.EXPORT, "export the container filesystem", export_inputs, [last])
    ]
    overlays = add(
        "overlays",
        StepKind.OVERLAYS,
        f"{len(script.overlays)} overlay(s)",
        {
            "overlays": [overlay_inputs(o, facts) for o in script.overlays],
            # No step is shared between builds for two platforms, this one neither.
            **({"platform": c.platform} if c.platform is not None else {}),
        },
        [],
    )
    add(
        "assemble",
        StepKind.ASSEMBLE,
        f"assemble {script.filesystem.type.value} image",
        assemble_inputs(script, facts),
        [*exported, overlays],
    )
    return steps


def layered(script: BuildScript) -> bool:
    """Whether the build keeps what each command changed (`BuildScript.layered`)."""
    return script.layered


def build_graph(steps: list[Step]) -> nx.DiGraph:
    """The steps as a networkx DiGraph, edges from each dependency to its dependent."""
    import networkx as nx  # imported on demand: it costs ~0.1 s at start-up

    graph = nx.DiGraph()
    for step in steps:
        graph.add_node(step.id, step=step)
        for parent in step.parents:
            graph.add_edge(parent, step.id)
    if not nx.is_directed_acyclic_graph(graph):
        raise AssertionError("build graph has a cycle")
    return graph
