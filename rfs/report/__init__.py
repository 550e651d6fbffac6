"""Stage 4, tell the person: the event stream (`--json`), the live progress display, the
summary, and the choice between them.

May import `rfs.graph` (steps and the plan it reports), `rfs.host` and `rfs.errors`.
"""
