"""Stage 3, execute one step: base facts, package snapshots, copy-in, the container a command
runs in, export, and assembly through `rfs.fs`; the local store the results live in.

May import `rfs.report`, `rfs.engine`, `rfs.fs`, `rfs.graph`, `rfs.script`, `rfs.host` and
`rfs.errors`; never `rfs.remote` or `rfs.pipeline`, which drive it.
"""
