"""The image config a committed step gets: the parent's, with the step's settings undone."""

from __future__ import annotations

from rfs.engine.base import MANAGED_LABEL, RunSpec
from rfs.engine.commitconfig import _DEFAULT_PATH, commit_config, podman_changes


def test_the_parents_settings_are_restated_and_the_steps_undone() -> None:
    parent = {
        "User": "app",
        "Env": ["PATH=/opt/bin", "A=1"],
        "Labels": {"l": "v"},
        "Cmd": ["sh"],
        "Hostname": "ignored",
    }
    conf = commit_config(
        parent,
        RunSpec(
            image="x",
            argv=("true",),
            user="1000",
            working_dir="/tmp",
            env={"A": "2", "B": "3", "PATH": "/y"},
            labels={"org.rfs.run": "r1"},
        ),
    )
    assert conf["User"] == "app"  # the parent's, not the step's
    assert conf["WorkingDir"] == "/"  # the parent had none: Docker's meaning of empty
    assert conf["Env"] == ["PATH=/opt/bin", "A=1", "B"]  # B unset again; A and PATH kept
    assert conf["Labels"] == {"l": "v", "org.rfs.run": "", MANAGED_LABEL: ""}
    assert conf["Cmd"] == ["sh"] and "Hostname" not in conf


def test_an_unset_path_goes_back_to_dockers_default() -> None:
    conf = commit_config({}, RunSpec(image="x", argv=("true",), env={"PATH": "/mine"}))
    assert conf["Env"] == [f"PATH={_DEFAULT_PATH}"]
    assert "User" not in conf and "WorkingDir" not in conf  # nothing to undo


def test_podman_changes_say_the_same_as_far_as_podman_can() -> None:
    conf = {
        "Cmd": ["sh"],
        "User": "0",
        "WorkingDir": "/",
        "Labels": {"org.rfs.run": "", "kept": "v", "has space": "", 'q"uote': ""},
    }
    assert podman_changes(conf) == [
        'CMD ["sh"]',
        "ENTRYPOINT []",
        "USER 0",
        "WORKDIR /",
        "LABEL org.rfs.run=",
    ]
