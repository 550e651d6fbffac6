"""The host, below every stage: subprocesses and their output, signals, file locks, leftovers
of interrupted runs, sparse files, and the blake3 digests of files and values.

May import only `rfs.errors`.
"""
