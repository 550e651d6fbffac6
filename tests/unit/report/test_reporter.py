"""The reporters (plain, live, JSON), explanations, /proc progress and the watch loop, without
an engine: steps come from the real compiler, output goes to recording sinks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rfs.errors import StepFailed
from rfs.graph.compiler import build_graph, compile_steps
from rfs.graph.explain import explain_plan, line_changes, line_hashes, remembered_text
from rfs.graph.planner import Action, Decision, manifest, plan
from rfs.graph.steps import Facts, Step
from rfs.report.display import make_reporter
from rfs.report.events import JsonReporter
from rfs.report.reporter import (
    ConsoleReporter,
    Reporter,
    Tee,
    format_seconds,
    format_size,
)
from rfs.script.schema import parse_script
from tests.events import SCHEMA, validate_events
from tests.waiting import until

SCRIPT = """
[filesystem]
size_mib = 64
[container]
image = { name = "busybox", tag = "1" }
[[commands]]
script_inline = '''
#!/bin/sh
echo one
echo two
echo three
'''
[[commands]]
command = "touch /x"
[[overlays]]
source_inline = "hello"
destination = "/etc/motd"
[[overlays]]
source_inline = "nameserver 10.0.0.1"
destination = "/etc/resolv.conf"
"""
FACTS = Facts(base_id="sha256:" + "a" * 64, mkfs_version="mke2fs 1.47.2")


def compiled(text: str = SCRIPT, facts: Facts = FACTS) -> tuple[Any, list[Step]]:
    script = parse_script(tomllib.loads(text))[0]
    return script, compile_steps(script, facts)


def decisions(
    steps: list[Step], available: set[str], previous: dict[str, Any] | None = None
) -> list[Decision]:
    return plan(
        build_graph(steps),
        lambda s: None if s.id in available else "no cache entry",
        previous or {},
    )


class Recording(Reporter):
    """A recording sink: every call, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def started(self, step: Step, reason: str) -> None:
        self.calls.append(("started", step.id))

    def output(self, step: Step, data: bytes) -> None:
        self.calls.append(("output", data))

    def progress(self, step: Step, done: int, total: int | None = None) -> None:
        self.calls.append(("progress", done))

    def close(self, error: BaseException | None = None) -> None:
        self.calls.append(("close", type(error).__name__ if error else None))


def drive(reporter: Reporter, *, fail: bool = False) -> list[Step]:
    """Feed `reporter` a build: base, run[0] and diff[0] cached, run[1] runs (with output),
    then diff[1] and assemble run, or run[1] fails."""
    _, steps = compiled()
    by_id = {s.id: s for s in steps}
    plan_ = decisions(steps, {"base", "run[0]", "diff[0]", "overlays"})
    reporter.planned(plan_)
    for d in plan_:
        if d.action is not Action.RUN:
            reporter.reused(d.step, d.action, 1.5 if d.step.id == "run[0]" else None)
    run1 = by_id["run[1]"]
    reporter.started(run1, "never built")
    reporter.output(run1, b"hello wor")
    reporter.output(run1, b"ld\nprogress 10%\rprogress 99%\rprogress 100%\r\nlast line")
    if fail:
        reporter.failed(run1, 0.25, "step run[1] failed: exited with code 3")
        reporter.close(StepFailed("run[1]", "exited with code 3"))
        return steps
    reporter.finished(run1, 0.5)
    reporter.started(by_id["diff[1]"], "run[1] changed")
    reporter.progress(by_id["diff[1]"], 1 << 20)
    reporter.finished(by_id["diff[1]"], 0.2, 3 << 20)
    reporter.started(by_id["assemble"], "diff[1] changed")
    reporter.finished(by_id["assemble"], 0.1, 64 << 20)
    reporter.close(None)
    return steps


# --- plain lines (CI logs) -----------------------------------------------------------------


def test_console_reporter_line_format() -> None:
    sink = io.StringIO()
    drive(ConsoleReporter(sink))
    lines = sink.getvalue().splitlines()
    assert "  cached   run[0]     commands[0] inline script (4 lines): echo one" in lines
    assert lines.count("  cached   overlays   2 overlay(s)") == 1
    assert not any(line.startswith("  cached   base") for line in lines)  # skipped, not cached
    assert any(
        line.startswith("  run      run[1]     commands[1]") and "(never built)" in line
        for line in lines
    )
    # output lines are whole, prefixed with the step, and a \r redraw keeps its last state
    assert "  run[1] | hello world" in lines
    assert "  run[1] | progress 100%" in lines
    assert not any("progress 10%" in line for line in lines)
    assert "  run[1] | last line" in lines  # the unterminated last line comes at the end
    assert lines.index("  run[1] | last line") < lines.index("  done     run[1]     0.50 s")
    assert "  done     diff[1]    0.20 s, 3.0 MiB" in lines
    # the summary table: every step in plan order, then the totals and the time saved
    table = lines[lines.index(next(ln for ln in lines if ln.split()[:2] == ["step", "result"])) :]
    assert [row.split()[0] for row in table[1:-1]] == [
        "base",
        "run[0]",
        "diff[0]",
        "run[1]",
        "diff[1]",
        "overlays",
        "assemble",
    ]
    assert table[2].split()[:3] == ["run[0]", "cached", "(1.50"]
    assert table[3].split()[:2] == ["diff[0]", "cached"]
    assert table[4].split()[:3] == ["run[1]", "ran", "0.50"]
    assert "64.0 MiB" in table[7]
    assert table[-1].startswith("3 step(s) ran, 3 cached, ")
    assert table[-1].endswith("; the cache saved 1.50 s")


def test_console_reporter_quiet_hides_output_only() -> None:
    sink = io.StringIO()
    drive(ConsoleReporter(sink, quiet=True))
    text = sink.getvalue()
    assert " | " not in text
    assert "  done     run[1]" in text and "the cache saved" in text


def test_console_reporter_failure_marks_the_rest_not_run() -> None:
    sink = io.StringIO()
    drive(ConsoleReporter(sink), fail=True)
    lines = sink.getvalue().splitlines()
    assert "  FAILED   run[1]     after 0.25 s: step run[1] failed: exited with code 3" in lines
    assert "  run[1] | last line" in lines
    rows = {
        line.split()[0]: line.split()[1]
        for line in lines
        if line.startswith("  ") and len(line.split()) > 1
    }
    assert rows["run[1]"] == "failed" and rows["diff[1]"] == "not"  # "not run"
    assert lines[-1].startswith("1 step(s) failed, 0 step(s) ran, 3 cached")


def test_console_progress_is_rate_limited() -> None:
    sink = io.StringIO()
    reporter = ConsoleReporter(sink)
    _, steps = compiled()
    diff = next(s for s in steps if s.id == "diff[1]")
    reporter.started(diff, "why")
    for n in range(100):
        reporter.progress(diff, n)
    assert "progress" not in sink.getvalue()  # less than PLAIN_PROGRESS_EVERY_S since start
    reporter._last_progress["diff[1]"] -= 60
    reporter.progress(diff, 5 << 20, 10 << 20)
    assert "  progress diff[1]    5.0 MiB of about 10.0 MiB" in sink.getvalue()


def test_a_step_planned_to_run_can_be_reused() -> None:
    """Another build made it while this one waited for its lock: cached, not "not run"."""
    sink = io.StringIO()
    reporter = ConsoleReporter(sink)
    _, steps = compiled()
    reporter.planned(decisions(steps, set()))
    reporter.reused(steps[1], Action.CACHED, None)
    assert reporter.results["run[0]"].status == "cached"
    assert "  cached   run[0]" in sink.getvalue()
    assert reporter.summary_totals().pending == len(steps) - 1  # all but run[0]


def test_close_before_plan_prints_no_summary() -> None:
    sink = io.StringIO()
    ConsoleReporter(sink).close(RuntimeError("bad script"))
    assert sink.getvalue() == ""


def test_tee_fans_out_and_keeps_results() -> None:
    a, b = Recording(), Recording()
    tee = Tee(a, b)
    drive(tee)
    assert a.calls == b.calls
    assert ("output", b"hello wor") in a.calls and a.calls[-1] == ("close", None)
    assert tee.summary_totals().ran == 3 and tee.summary_totals().saved == 1.5


def test_make_reporter_is_plain_off_a_terminal() -> None:
    assert type(make_reporter(io.StringIO())) is ConsoleReporter


def test_formats() -> None:
    assert format_size(512) == "512 B" and format_size(3 << 20) == "3.0 MiB"
    assert format_seconds(0.5) == "0.50 s" and format_seconds(12.34) == "12.3 s"
    assert format_seconds(125) == "2 min 05 s" and format_seconds(3725) == "1 h 02 min"


# --- the live display, on a pretend terminal ---------------------------------------------


def test_live_reporter_renders_steps_output_and_table() -> None:
    from rich.console import Console

    from rfs.report.progress import LiveReporter

    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, width=120, color_system=None)
    reporter = LiveReporter(sink, console=console)
    drive(reporter)
    text = sink.getvalue()
    assert "✓ cached  run[0]" in text and "saved 1.50 s" in text
    assert "▶ run     run[1]" in text and "(never built)" in text
    assert "│ hello world" in text and "│ progress 100%" in text
    assert "✓ done    diff[1]" in text and "3.0 MiB" in text
    assert "3 step(s) ran, 3 cached" in text and "the cache saved 1.50 s" in text
    # the header shows the reason once; steps without output carry it on their done line
    assert "✓ done    assemble" in text and "(diff[1] changed)" in text


def test_live_reporter_does_not_interpret_markup_in_output() -> None:
    from rich.console import Console

    from rfs.report.progress import LiveReporter

    sink = io.StringIO()
    reporter = LiveReporter(
        sink, console=Console(file=sink, force_terminal=True, width=100, color_system=None)
    )
    _, steps = compiled()
    reporter.planned(decisions(steps, set()))
    reporter.started(steps[1], "never built")
    reporter.output(steps[1], b"[bold]x[/bold] \x1b[31mred\x1b[0m\n")
    reporter.failed(steps[1], 0.1, "boom [red]")
    reporter.close(StepFailed("run[0]", "boom"))
    text = sink.getvalue()
    assert "[bold]x[/bold] red" in text  # markup kept literally, ANSI colours applied
    assert "boom [red]" in text


# --- JSON events ---------------------------------------------------------------------------


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_events_follow_the_schema() -> None:
    sink = io.StringIO()
    reporter = JsonReporter(sink, output="out.ext4")
    reporter._last_progress.clear()
    drive(reporter)
    events = _events(sink.getvalue())
    validate_events(events)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "build_finished"
    assert kinds.count("step_cached") == 3 and kinds.count("step_skipped") == 1
    assert [e["text"] for e in events if e["event"] == "step_output"] == [
        "hello world",
        "progress 100%",
        "last line",
    ]
    finished = {e["step"]: e for e in events if e["event"] == "step_finished"}
    assert finished["diff[1]"]["bytes"] == 3 << 20 and finished["run[1]"]["seconds"] == 0.5
    last = events[-1]
    assert last["ok"] is True and last["exit_code"] == 0 and last["output"] == "out.ext4"
    assert (last["ran"], last["cached"], last["saved_seconds"]) == (3, 3, 1.5)


def test_json_failure_event_and_exit_code() -> None:
    sink = io.StringIO()
    drive(JsonReporter(sink), fail=True)
    events = _events(sink.getvalue())
    validate_events(events)
    failed = next(e for e in events if e["event"] == "step_failed")
    assert failed["step"] == "run[1]" and "exited with code 3" in failed["error"]
    assert events[-1]["ok"] is False and events[-1]["exit_code"] == 1
    assert events[-1]["output"] is None


def test_schema_rejects_a_malformed_event() -> None:
    import jsonschema

    bad = {
        "v": 1,
        "event": "step_finished",
        "time": 1.0,
        "step": "run[0]",
        "kind": "run",
        "key": "a" * 64,
        "seconds": -1,
        "bytes": None,
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


# --- explanations --------------------------------------------------------------------------


def _previous(text: str, facts: Facts = FACTS) -> dict[str, Any]:
    script, steps = compiled(text, facts)
    return {s.id: {**manifest(s), **remembered_text(script, s)} for s in steps}


def test_explain_names_the_changed_line_and_overlay_destination() -> None:
    previous = _previous(SCRIPT)
    edited = SCRIPT.replace("echo two", "echo TWO").replace(
        "nameserver 10.0.0.1", "nameserver 10.0.0.2"
    )
    script, steps = compiled(edited)
    d = decisions(steps, {"base"}, previous)
    changes = explain_plan(d, previous, script)
    assert changes["run[0]"] == ["commands[0]: script changed (line 3: `echo TWO`)"]
    assert changes["run[1]"] == [
        "commands[1]: runs on top of commands[0], which changed "
        "(script changed (line 3: `echo TWO`))"
    ]
    assert changes["overlays"] == ["overlays: /etc/resolv.conf content changed"]
    assert changes["diff[0]"] == [
        "diff[0]: reads what commands[0] changed, which ran again "
        "(script changed (line 3: `echo TWO`))"
    ]
    assert changes["diff[1]"] == [
        "diff[1]: reads what commands[1] changed, which ran again",
        "diff[1]: is laid on diff[0], which changed",
    ]
    assert changes["assemble"] == [
        "assemble: diff[0] changed",
        "assemble: diff[1] changed",
        "assemble: overlays changed (/etc/resolv.conf content changed)",
    ]


def test_explain_inserted_overlay_names_only_that_one() -> None:
    previous = _previous(SCRIPT)
    edited = SCRIPT.replace(
        "[[overlays]]",
        '[[overlays]]\nsource_inline = "x"\ndestination = "/etc/issue"\nmode = 0o600\n[[overlays]]',
        1,
    )
    script, steps = compiled(edited)
    changes = explain_plan(
        decisions(steps, {"base", "run[0]", "diff[0]", "run[1]", "diff[1]"}, previous),
        previous,
        script,
    )
    assert changes["overlays"] == ["overlays: /etc/issue added"]


def test_explain_base_moved_new_command_and_filesystem_field() -> None:
    previous = _previous(SCRIPT)
    moved = Facts(base_id="sha256:" + "b" * 64, mkfs_version="mke2fs 1.47.2")
    edited = SCRIPT.replace("size_mib = 64", "size_mib = 128") + '[[commands]]\ncommand = "true"\n'
    script, steps = compiled(edited, moved)
    changes = explain_plan(decisions(steps, set(), previous), previous, script)
    assert changes["base"][0].startswith("base: image busybox:1 now resolves to a different ID")
    assert changes["run[0]"][0].startswith("commands[0]: runs on a different base image")
    assert changes["run[2]"] == ["commands[2]: never built (new since the last build)"]
    assert "assemble: filesystem.size_mib changed (64 → 128)" in changes["assemble"]


def test_explain_first_build_and_unchanged_but_missing() -> None:
    script, steps = compiled()
    first = explain_plan(decisions(steps, set()), {}, script)
    assert first["run[0]"] == ["commands[0]: never built (no earlier build of this script)"]
    previous = _previous(SCRIPT)
    again = explain_plan(
        decisions(steps, {"base", "run[0]", "overlays"}, previous), previous, script
    )
    assert again["run[1]"] == ["commands[1]: inputs unchanged, but no cache entry"]


def test_explain_command_env_and_mode() -> None:
    base = SCRIPT + '[[overlays]]\nsource_inline = "s"\ndestination = "/etc/shadow"\nmode = 0o640\n'
    previous = _previous(base)
    edited = base.replace('command = "touch /x"', 'command = "touch /y"\nenv = { A = "1" }')
    edited = edited.replace("mode = 0o640", "mode = 0o600")
    script, steps = compiled(edited)
    changes = explain_plan(decisions(steps, {"base", "run[0]"}, previous), previous, script)
    assert changes["run[1]"] == [
        "commands[1]: command changed (`touch /x` → `touch /y`)",
        "commands[1]: env.A added",
    ]
    assert changes["overlays"] == ["overlays: /etc/shadow mode changed (0o640 → 0o600)"]


def test_line_changes_spans() -> None:
    old = line_hashes(b"a\nb\nc\nd\n")
    assert line_changes(old, line_hashes(b"a\nB\nC\nd\n")) == "lines 2-3"
    assert line_changes(old, line_hashes(b"a\nb\nc\nx\nd\n"), b"a\nb\nc\nx\nd\n") == (
        "line 4 added: `x`"
    )
    assert line_changes(old, line_hashes(b"a\nc\nd\n")) == "line 2 removed"


# --- /proc progress and the watch loop ----------------------------------------------------


def test_child_reads_counts_what_a_child_reads() -> None:
    from rfs.host.childio import child_reads

    seen: list[int] = []
    payload = b"x" * (4 << 20)

    def reported(count: int) -> Callable[[], bool]:
        return lambda: bool(seen) and seen[-1] >= count

    with child_reads("cat", seen.append, interval=0.02):
        proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert proc.stdin is not None
        for end in range(1 << 20, len(payload) + 1, 1 << 20):
            proc.stdin.write(payload[end - (1 << 20) : end])
            proc.stdin.flush()
            # cat has read it all (its count also holds what the loader read): one report each
            until(reported(end), f"a report of {end} bytes read")
        proc.stdin.close()
        proc.wait()
    assert seen, "no progress was reported"
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # only growing counts
    assert seen[-1] >= 3 << 20


def test_watch_snapshot_sees_edits_and_ignores_output(tmp_path: Path) -> None:
    from rfs.commands.watch import changed, snapshot, wait_for_change

    (tmp_path / "build.toml").write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_text("1")
    out = tmp_path / "image.ext4"
    out.write_text("image")
    before = snapshot(tmp_path, [out])
    assert list(before) == [str(tmp_path / "build.toml")]

    (tmp_path / ".git" / "index").write_text("2")  # hidden: ignored
    out.write_text("new image")  # the output: ignored
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "motd").write_text("hi")
    after, paths = wait_for_change(tmp_path, before, [out], poll_s=0.05, debounce_s=0.1)
    assert paths == [str(tmp_path / "files" / "motd")]
    assert changed(before, after) == paths


def test_watch_keeps_going_after_a_failed_build(tmp_path: Path) -> None:
    from rfs.commands.watch import watch
    from rfs.errors import ScriptError

    (tmp_path / "build.toml").write_text("x")
    builds: list[float] = []

    def build() -> int:
        builds.append(time.monotonic())
        if len(builds) == 1:
            raise ScriptError([])  # shown, and the watch goes on
        raise KeyboardInterrupt  # Ctrl-C during the second build's preparation

    class Output(io.StringIO):
        """What the watch prints; the script is edited once it says it is watching (another
        size: the edit is seen whatever the clock's resolution)."""

        def write(self, text: str) -> int:
            if text.startswith("rfs: watching") and len(builds) == 1:
                (tmp_path / "build.toml").write_text("edited")
            return super().write(text)

    out = Output()
    assert watch(tmp_path, build, out=out, poll_s=0.05) == 0
    assert len(builds) == 2
    assert "changed: build.toml: building again" in out.getvalue()
    assert out.getvalue().endswith("rfs: stopped watching\n")


def test_rfs_help_does_not_import_rich_or_networkx() -> None:
    code = (
        "import sys; from rfs.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('rich', 'networkx', 'jsonschema') if m in sys.modules]\n"
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


def test_live_reporter_shows_every_running_step_and_keeps_their_lines_apart() -> None:
    """With `rfs build -j`, two steps run at once: the footer shows both, and each one's
    output (even a line split across chunks) is printed under its own header."""
    from rich.console import Console

    from rfs.report.progress import LiveReporter

    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, width=120, color_system=None)
    reporter = LiveReporter(sink, console=console)
    _, steps = compiled()
    reporter.planned(decisions(steps, set()))
    one, two = steps[1], steps[3]  # run[0] and run[1] (diff[0] is between them)
    reporter.started(one, "never built")
    reporter.started(two, "never built")
    footer = Console(file=io.StringIO(), width=120, color_system=None)
    with footer.capture() as shown:
        footer.print(reporter._footer())
    assert "running  run[0]" in shown.get() and "running  run[1]" in shown.get()
    reporter.output(one, b"first ha")
    reporter.output(two, b"second line\n")
    reporter.output(one, b"lf\n")
    reporter.finished(one, 0.5)
    reporter.finished(two, 0.5)
    reporter.close()
    lines = [line.strip() for line in sink.getvalue().splitlines()]
    text = "\n".join(lines)
    assert "│ first half" in text and "│ second line" in text
    assert text.index("▶ run     run[1]") < text.index("│ second line")
    # run[0]'s header again before its line: run[1] printed in between
    second = text.index("│ first half")
    assert text.rindex("▶ run     run[0]", 0, second) > text.index("│ second line")
