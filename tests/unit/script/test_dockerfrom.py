"""The images a Dockerfile's stages refer to (`rfs.script.dockerfrom`): what the key of a
`container.dockerfile` base holds by ID. The pipeline's use of them is tested in
pipeline/test_dockerfilebase.py, and on the real engines in tests/integration."""

from __future__ import annotations

import pytest

from rfs.script.dockerfrom import from_images, split_ref

MULTI = b"""\
# syntax and comments are the parser's business
ARG BASE=busybox
ARG TAG=1.0
ARG UNSET
FROM ${BASE}:${TAG} AS Build
ARG TAG=stage-local
RUN echo \\
    continued
FROM build AS second
FROM --platform=linux/arm64 alpine:3 AS third
COPY --from=BUILD /a /b
COPY --chown=1:1 --from=nginx:latest /c /d
COPY --from=0 /e /f
FROM scratch
COPY --from=second /g /h
FROM $BASE
FROM busybox${UNSET}
"""


def test_external_images_in_order_without_stages_indexes_or_scratch() -> None:
    assert from_images(MULTI, {}, None) == ["busybox:1.0", "alpine:3", "nginx:latest", "busybox"]


def test_build_args_override_declared_arg_defaults_only() -> None:
    found = from_images(MULTI, {"TAG": "2.0", "UNDECLARED": "x"}, None)
    assert found[0] == "busybox:2.0"
    assert from_images(b"FROM img:${V}\n", {"V": "9"}, None) == ["img:"]  # as the engine


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("build", ["busybox:1.0"]),
        ("second", ["busybox:1.0"]),
        ("THIRD", ["busybox:1.0", "alpine:3", "nginx:latest"]),
    ],
)
def test_only_the_stages_up_to_the_target_count(target: str, expected: list[str]) -> None:
    assert from_images(MULTI, {}, target) == expected


def test_an_image_used_twice_is_listed_once() -> None:
    text = b"FROM a:1 AS x\nFROM a:1\nCOPY --from=a:1 /x /y\n"
    assert from_images(text, {}, None) == ["a:1"]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("busybox", ("busybox", "latest")),
        ("rfs-test/busybox:1", ("rfs-test/busybox", "1")),
        ("localhost:5000/x", ("localhost:5000/x", "latest")),
        ("localhost:5000/x:2", ("localhost:5000/x", "2")),
        ("x@sha256:ab", ("x", "sha256:ab")),
    ],
)
def test_split_ref(ref: str, expected: tuple[str, str]) -> None:
    assert split_ref(ref) == expected


def test_the_engines_variable_forms() -> None:
    text = b"ARG X\nARG Y=y\nFROM a:${X:-dflt}\nFROM b:${Y:+set}\nFROM c${X:+-never}\nFROM d:$Y\n"
    assert from_images(text, {}, None) == ["a:dflt", "b:set", "c", "d:y"]
    assert from_images(text, {"X": "given"}, None)[:3] == ["a:given", "b:set", "c-never"]
    assert from_images(b'ARG Y=y\nFROM "e:$Y"\nFROM f\\$Y\n', {}, None) == ["e:y", "f$Y"]
