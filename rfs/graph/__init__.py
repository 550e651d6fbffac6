"""Stage 2, compile and plan: the build script becomes a networkx DAG of content-addressed
steps (`compiler`), whose keys hash every input (`inputs`, `codeversion`); the planner decides,
as a pure function of the graph and what the caches hold, which steps run and why (`planner`,
`explain`).

May import `rfs.script`, `rfs.host` and `rfs.errors`; never an engine, a store or a remote.
"""
