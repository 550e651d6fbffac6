"""The stages wired together: `build.prepare` loads, gathers the base facts, compiles and
plans; `build.execute` runs the plan through `rfs.run`, fetching from and pushing to the
remote cache when one is set, and reports through `rfs.report`. Planning happens here only.

May import every stage, `rfs.remote`, `rfs.engine`, `rfs.fs`, `rfs.host` and `rfs.errors`.
"""
