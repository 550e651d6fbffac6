"""Booting a built image under QEMU, for `rfs boot`.

May import `rfs.host` and `rfs.errors`.
"""
