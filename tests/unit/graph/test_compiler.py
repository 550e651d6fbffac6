"""The keys of the recipe fields (#14): each lands in the key of the step it acts on, as the
value that acts, and nowhere else."""

from __future__ import annotations

import tomllib

from rfs.graph.compiler import compile_steps
from rfs.graph.steps import Facts
from rfs.script.schema import parse_script

HEAD = """
[container]
image = { name = "a", tag = "b" }
"""
FACTS = Facts(base_id="sha256:" + "0" * 64, file_digests={"/f": "d1", "/g": "d2"})


def keys(text: str, facts: Facts = FACTS) -> dict[str, str]:
    script, _ = parse_script(tomllib.loads(text))
    return {s.id: s.key for s in compile_steps(script, facts)}


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a if a[k] != b.get(k)}


TWO = HEAD + '[[commands]]\ncommand = "one"\n[[commands]]\ncommand = "two"\n'


def test_a_default_is_keyed_as_the_value_each_command_runs_with() -> None:
    per_command = keys(
        HEAD + '[[commands]]\ncommand = "one"\nuid = 7\nworking_dir = "/w"\n'
        '[[commands]]\ncommand = "two"\nuid = 7\nworking_dir = "/w"\n'
    )
    as_default = keys(
        HEAD + 'uid = 7\nworking_dir = "/w"\n'
        '[[commands]]\ncommand = "one"\n[[commands]]\ncommand = "two"\n'
    )
    assert per_command == as_default
    plain = keys(TWO)
    assert changed(plain, as_default) == {"run[0]", "diff[0]", "run[1]", "diff[1]", "assemble"}
    overridden = keys(
        HEAD + 'gid = 5\n[[commands]]\ncommand = "one"\ngid = 0\n[[commands]]\ncommand = "two"\n'
    )
    # Only the second command runs with gid 5: the first says 0.
    assert changed(
        keys(HEAD + '[[commands]]\ncommand = "one"\ngid = 0\n[[commands]]\ncommand = "two"\n'),
        overridden,
    ) == {"run[1]", "diff[1]", "assemble"}


def test_copies_are_in_the_first_commands_key_only() -> None:
    base = keys(TWO)
    copied = TWO + '[[copy]]\nsource = "/f"\ndestination = "/etc/f"\n'
    with_copy = keys(copied)
    assert changed(base, with_copy) == {"run[0]", "diff[0]", "run[1]", "diff[1]", "assemble"}
    edited = keys(copied, Facts(base_id=FACTS.base_id, file_digests={"/f": "other"}))
    assert changed(with_copy, edited) == {"run[0]", "diff[0]", "run[1]", "diff[1]", "assemble"}
    for extra in ("mode = 0o600", "uid = 1", "gid = 1"):
        assert changed(with_copy, keys(copied + extra + "\n")) == {
            "run[0]",
            "diff[0]",
            "run[1]",
            "diff[1]",
            "assemble",
        }, extra


def test_all_root_and_outputs_are_in_the_assemble_key_only() -> None:
    squash = HEAD + '[filesystem]\ntype = "Squashfs"\n[[commands]]\ncommand = "one"\n'
    base = keys(squash)
    rooted = keys(squash.replace('type = "Squashfs"', 'type = "Squashfs"\nall_root = true'))
    assert changed(base, rooted) == {"assemble"}
    out = squash + '[[outputs]]\npath = "/etc/x"\n'
    assert changed(base, keys(out)) == {"assemble"}
    assert changed(keys(out), keys(out + "remove = true\n")) == {"assemble"}
    assert changed(keys(out), keys(out + 'to = "y"\n')) == {"assemble"}


def test_scripts_without_the_new_fields_keep_their_keys() -> None:
    """The new fields are absent from the manifests unless set: no cache is invalidated."""
    script, _ = parse_script(tomllib.loads(TWO))
    steps = {s.id: s for s in compile_steps(script, FACTS)}
    assert "copy" not in steps["run[0]"].inputs
    assert "all_root" not in steps["assemble"].inputs
    assert "outputs" not in steps["assemble"].inputs
