"""Stage 1, load: the build script (TOML or YAML) and its package, read and checked into the
frozen model (`model.BuildScript`); buildfs package archives, packing and unpacking them, and
the archive safety rules that every tar read from outside passes.

May import `rfs.host` and `rfs.errors`.
"""
