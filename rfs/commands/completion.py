"""`rfs completion bash|zsh|fish`: a shell completion script generated from rfs's own parser.

    source <(rfs completion bash)                    # or save it in bash-completion's dir
    rfs completion zsh > "${fpath[1]}/_rfs"          # then compinit
    rfs completion fish > ~/.config/fish/completions/rfs.fish

The scripts are static: a Tab press runs no Python, and they follow the verbs and options
of the installed rfs because they are generated from its argparse parser. Neither library
fits: shtab writes no fish scripts, and argcomplete starts Python (rfs and its imports) on every
Tab press.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rfs.errors import EXIT_OK

SHELLS = ("bash", "zsh", "fish")


def register(sub: Any) -> None:
    """Add the `completion` parser."""
    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh, fish)")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=run)


@dataclass
class Option:
    """One option of the parser, as completion needs it."""

    flags: list[str]
    help: str
    takes_value: bool
    choices: list[str] = field(default_factory=list)
    path: bool = False  # its value is a file or directory


@dataclass
class Verb:
    """A subcommand: its names (aliases after the first), options and first positional."""

    names: list[str]
    help: str
    options: list[Option]
    positional_choices: list[str] = field(default_factory=list)
    positional_path: bool = False


def _options(parser: argparse.ArgumentParser) -> list[Option]:
    out = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        takes = action.nargs != 0
        choices = [str(c) for c in action.choices] if action.choices else []
        out.append(
            Option(
                list(action.option_strings),
                _help(action.help),
                takes,
                choices,
                path=takes and action.type is Path,
            )
        )
    return out


def _help(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= 70 else text[:69] + "…"


def describe(parser: argparse.ArgumentParser) -> tuple[list[Option], list[Verb]]:
    """The global options and the verbs of `parser`."""
    verbs: list[Verb] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        names_of: dict[int, list[str]] = {}
        parsers: dict[int, argparse.ArgumentParser] = {}
        for name, sub in action.choices.items():
            names_of.setdefault(id(sub), []).append(name)
            parsers[id(sub)] = sub
        for key, names in names_of.items():
            sub = parsers[key]
            positionals = [a for a in sub._actions if not a.option_strings]
            first = positionals[0] if positionals else None
            verbs.append(
                Verb(
                    names,
                    _help(helps.get(names[0])),
                    _options(sub),
                    [str(c) for c in first.choices] if first is not None and first.choices else [],
                    first is not None and not first.choices,
                )
            )
    return _options(parser), verbs


# --- bash ---------------------------------------------------------------------------------


def bash(parser: argparse.ArgumentParser) -> str:
    """A bash completion script (bash-completion not required)."""
    options, verbs = describe(parser)
    all_names = " ".join(n for v in verbs for n in v.names)
    value_cases = []
    global_flags = {f for o in options for f in o.flags}
    for scope, opts in [("", options)] + [("|".join(v.names), v.options) for v in verbs]:
        for o in opts:
            if not o.takes_value or (scope and set(o.flags) <= global_flags):
                continue  # global options (accepted after the verb too) have one case
            verbs_here = scope.split("|") if scope else ["*"]  # global: before any verb
            pattern = "|".join(f"{n}:{f}" for n in verbs_here for f in o.flags)
            if o.choices:
                action = f'COMPREPLY=($(compgen -W "{" ".join(o.choices)}" -- "$cur"))'
            elif o.path:
                action = 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
            else:
                action = "COMPREPLY=()"
            value_cases.append(f"        {pattern}) {action}; return ;;")
    verb_cases = []
    for v in verbs:
        flags = " ".join(f for o in v.options for f in o.flags)
        if v.positional_choices:
            positional = f'COMPREPLY=($(compgen -W "{" ".join(v.positional_choices)}" -- "$cur"))'
        elif v.positional_path:
            positional = 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            positional = "COMPREPLY=()"
        verb_cases.append(
            f"        {'|'.join(v.names)})\n"
            f"            if [[ $cur == -* ]]; then\n"
            f'                COMPREPLY=($(compgen -W "{flags}" -- "$cur"))\n'
            f"            else\n"
            f"                {positional}\n"
            f"            fi ;;"
        )
    nl = "\n"
    return f"""# bash completion for rfs; generated by `rfs completion bash`.
_rfs() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} verb= i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            {"|".join(n for v in verbs for n in v.names)}) verb=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case "$verb:$prev" in
{nl.join(value_cases)}
    esac
    if [[ -z $verb ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "{" ".join(f for o in options for f in o.flags)}" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "{all_names}" -- "$cur"))
        fi
        return
    fi
    case $verb in
{nl.join(verb_cases)}
    esac
}}
complete -F _rfs rfs
"""


# --- zsh ----------------------------------------------------------------------------------


def _zq(text: str) -> str:
    """Text for inside a single-quoted _arguments spec: brackets and colons escaped."""
    text = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return text.replace(":", "\\:").replace("'", "'\\''")


def _zsh_option(o: Option) -> str:
    if o.choices:
        value = f":value:({' '.join(o.choices)})"
    elif o.path:
        value = ":file:_files"
    elif o.takes_value:
        value = ":value: "
    else:
        value = ""
    exclusive = f"({' '.join(o.flags)})" if len(o.flags) > 1 else ""
    names = "{" + ",".join(o.flags) + "}" if len(o.flags) > 1 else o.flags[0]
    return f"'{exclusive}'{names}'[{_zq(o.help)}]{value}'"


def zsh(parser: argparse.ArgumentParser) -> str:
    """A zsh completion function (#compdef), usable from $fpath or sourced after compinit."""
    options, verbs = describe(parser)
    described = "\n".join(f"        '{_zq(n)}:{_zq(v.help)}'" for v in verbs for n in v.names)
    cases = []
    for v in verbs:
        specs = [_zsh_option(o) for o in v.options]
        if v.positional_choices:
            specs.append(f"'1:{v.names[0]}:({' '.join(v.positional_choices)})'")
        elif v.positional_path:
            specs.append("'1:package:_files'")
        body = " \\\n                ".join(specs)
        cases.append(
            f"        ({'|'.join(v.names)})\n"
            f"            _arguments -s \\\n                {body} ;;"
        )
    global_specs = " \\\n        ".join(_zsh_option(o) for o in options)
    nl = "\n"
    return f"""#compdef rfs
# zsh completion for rfs; generated by `rfs completion zsh`.
_rfs() {{
    local curcontext=$curcontext state line
    local -a verbs
    verbs=(
{described}
    )
    _arguments -C -s \\
        {global_specs} \\
        '1: :->verb' \\
        '*:: :->args'
    case $state in
    (verb)
        _describe -t commands 'rfs command' verbs ;;
    (args)
        case $line[1] in
{nl.join(cases)}
        esac ;;
    esac
}}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _rfs "$@"
else
    compdef _rfs rfs
fi
"""


# --- fish ---------------------------------------------------------------------------------


def _fq(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_option(o: Option, condition: str) -> str:
    parts = ["complete -c rfs"]
    if condition:
        parts.append(f"-n {_fq(condition)}")
    for flag in o.flags:
        parts.append(f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}")
    if o.choices:
        parts.append(f"-x -a {_fq(' '.join(o.choices))}")
    elif o.path:
        parts.append("-r -F")
    elif o.takes_value:
        parts.append("-x")
    parts.append(f"-d {_fq(o.help)}")
    return " ".join(parts)


def fish(parser: argparse.ArgumentParser) -> str:
    """A fish completion script."""
    options, verbs = describe(parser)
    names = " ".join(n for v in verbs for n in v.names)
    lines = ["# fish completion for rfs; generated by `rfs completion fish`.", "complete -c rfs -f"]
    lines += [_fish_option(o, "") for o in options]
    for v in verbs:
        for n in v.names:
            lines.append(
                f"complete -c rfs -n {_fq(f'not __fish_seen_subcommand_from {names}')}"
                f" -a {n} -d {_fq(v.help)}"
            )
    for v in verbs:
        seen = f"__fish_seen_subcommand_from {' '.join(v.names)}"
        lines += [_fish_option(o, seen) for o in v.options]
        if v.positional_choices:
            lines.append(
                f"complete -c rfs -n {_fq(seen)} -x -a {_fq(' '.join(v.positional_choices))}"
            )
        elif v.positional_path:
            lines.append(f"complete -c rfs -n {_fq(seen)} -F")
    return "\n".join(lines) + "\n"


GENERATORS = {"bash": bash, "zsh": zsh, "fish": fish}


def script_for(shell: str) -> str:
    """The completion script for `shell`, from the parser of this rfs."""
    from rfs.commands import make_parser

    return GENERATORS[shell](make_parser())


def run(args: argparse.Namespace) -> int:
    """Print the script."""
    sys.stdout.write(script_for(args.shell))
    return EXIT_OK
