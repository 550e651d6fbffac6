"""The image config a committed step gets (Docker's commit would otherwise leak the step's
user, working directory, env and labels into every later step), and the same as Podman
`changes` (Podman 4.3's commit ignores the config body). Pure functions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rfs.engine.base import MANAGED_LABEL, RunSpec

# Docker supplies this PATH at run time when the image sets none; see `commit_config`.
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Image config fields a committed layer takes over from its parent.
_KEPT_CONFIG = (
    "User",
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
    "Healthcheck",
    "OnBuild",
    "Shell",
)


def commit_config(parent: Mapping[str, Any], spec: RunSpec) -> dict[str, Any]:
    """The image config for a committed step: the parent's, with the step's settings undone.

    Docker's commit fills every field we leave empty from the container's config, and merges in
    container env vars and labels whose keys we do not mention. So the step's user, working
    directory, env and labels would become defaults for every later step (and our run labels
    would mark containers others create from the layer). We therefore restate the parent's
    values and, where the parent had none, give the neutral equivalent:
    - User "" → "0" and WorkingDir "" → "/" (what Docker uses for empty);
    - an env key the parent lacked → "KEY" without "=", which Docker treats as unset when it
      runs a container; PATH → Docker's default PATH, which is what an unset PATH yields;
    - a label key the parent lacked → "" (labels cannot be deleted; an empty value matches no
      "key=value" filter).
    Only an empty parent Cmd cannot be restored: the step's argv stays as the layer's Cmd,
    which is harmless since rfs always passes a command.
    """
    conf: dict[str, Any] = {k: parent[k] for k in _KEPT_CONFIG if parent.get(k) is not None}
    if spec.user and not conf.get("User"):
        conf["User"] = "0"
    if spec.working_dir and not conf.get("WorkingDir"):
        conf["WorkingDir"] = "/"
    env = list(conf.get("Env") or [])
    parent_keys = {entry.split("=", 1)[0] for entry in env}
    for key in spec.env:
        if key not in parent_keys:
            env.append(f"PATH={_DEFAULT_PATH}" if key == "PATH" else key)
    if env:
        conf["Env"] = env
    labels = dict(conf.get("Labels") or {})
    for key in (*spec.labels, MANAGED_LABEL):
        labels.setdefault(key, "")
    conf["Labels"] = labels
    return conf


def podman_changes(conf: Mapping[str, Any]) -> list[str]:
    """`conf` as Dockerfile instructions, as far as Podman's commit can take them.

    Podman 4.3 builds the image config from the container and then applies these. Its parser
    takes one plain `LABEL key=value` per instruction, and ENV can set but not unset, so the
    step's env vars stay in the layer's config on Podman.
    """
    changes = [
        f"CMD {json.dumps(conf.get('Cmd') or [])}",
        f"ENTRYPOINT {json.dumps(conf.get('Entrypoint') or [])}",
    ]
    if conf.get("User"):
        changes.append(f"USER {conf['User']}")
    if conf.get("WorkingDir"):
        changes.append(f"WORKDIR {conf['WorkingDir']}")
    for key, value in (conf.get("Labels") or {}).items():
        if value == "" and key and not any(c.isspace() or c in "=\"'" for c in key):
            changes.append(f"LABEL {key}=")
    return changes
