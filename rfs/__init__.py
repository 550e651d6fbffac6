"""rfs: a Dockerfile for rootfs images.

A build script (TOML or YAML, buildfs-compatible) compiles into a DAG of content-addressed
steps; a rebuild reruns only the steps whose keys changed.
"""

__version__ = "0.1.0"
