"""The images a `container.dockerfile` base is built from: its `FROM` lines and the
`COPY --from=<image>` that name an image rather than a stage.

Their identity is part of the base's key (`rfs.graph.compiler.dockerfile_inputs`): a FROM image
re-tagged, rebuilt or pulled anew must build the base again, or a warm cache would keep a base
a clean build would not make. The Dockerfile is read with `dockerfile-parse`, which knows the
instruction syntax (continuations, comments, `FROM --platform=… image AS name`, quotes and
escapes); rfs substitutes the ARGs declared before the first FROM (`$NAME`, `${NAME}`,
`${NAME:-word}`, `${NAME:+word}`), their defaults overridden by the build args, as the engine
does (an undeclared build arg is not substituted, as in the engine). Stage names (an
earlier `AS name`, case-insensitive), stage indexes (`COPY --from=0`) and `scratch` are no
images. Only the stages the engine builds count: with `container.target`, those up to it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

# `COPY --from=X`: a flag before the sources, alone or among others (--chown, --chmod, --link).
_COPY_FROM = re.compile(r"(?:^|\s)--from=(\S+)", re.IGNORECASE)
# $NAME, ${NAME}, ${NAME:-word} and ${NAME:+word}, not escaped (\$): the forms the engines
# expand in FROM (dockerfile-parse knows the first two only).
_VARIABLE = re.compile(
    r"(?<!\\)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def _substitute(word: str, args: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        value = args.get(name, "")
        if match.group(2) == "-":
            return value or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if value else ""
        return value

    return _VARIABLE.sub(one, word)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def from_images(text: bytes, build_args: Mapping[str, str], target: str | None) -> list[str]:
    """The images, as written after ARG substitution, that the stages the engine builds refer
    to, in order of first use and without repeats (`ref`s to look up in the engine)."""
    from dockerfile_parse import DockerfileParser
    from dockerfile_parse.parser import image_from
    from dockerfile_parse.util import WordSplitter

    parser = DockerfileParser(fileobj=io.BytesIO(text), build_args=dict(build_args))
    structure = parser.structure
    # The ARGs before the first FROM, defaults replaced by build args: what FROM lines see.
    top_args: dict[str, str] = {}
    for instr in structure:
        if instr["instruction"] == "FROM":
            break
        if instr["instruction"] == "ARG":
            for name, value in _arg_pairs(instr["value"]):
                top_args[name] = build_args.get(name, value)

    def expand(word: str) -> str:
        # Variables first (with the modifiers), then the parser's quote and escape rules.
        return str(WordSplitter(_substitute(word, top_args), args={}).dequote())

    stages: set[str] = set()
    found: list[str] = []

    def use(ref: str) -> None:
        if ref and ref.lower() not in stages and ref.lower() != "scratch" and ref not in found:
            found.append(ref)

    in_target = False
    for instr in structure:
        op, value = instr["instruction"], instr["value"]
        if op == "FROM":
            if in_target:
                break  # past the target stage: the engine does not build it
            image, name = image_from(value)
            if image is None:
                continue  # no image: the engine's own build reports that line
            use(expand(image))
            if name is not None:
                stages.add(name.lower())
                in_target = target is not None and name.lower() == target.lower()
        elif op == "COPY" and (match := _COPY_FROM.search(value)):
            source = expand(_unquote(match.group(1)))
            if not source.isdigit():
                use(source)
    return found


def _arg_pairs(value: str) -> list[tuple[str, str]]:
    """`ARG A=1 B` as [("A", "1"), ("B", "")]."""
    from dockerfile_parse.util import extract_key_values

    pairs = extract_key_values(env_replace=False, args={}, envs={}, instruction_value=value)
    return [(str(k), str(v)) for k, v in pairs]


def split_ref(ref: str) -> tuple[str, str]:
    """(name, tag or digest) of an image reference, the tag "latest" when it has none."""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        return name, digest
    name, sep, tag = ref.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return ref, "latest"
