"""Filesystem images from container exports: the tar filter, overlays and mkfs drivers.

`tarstream` filters a `docker export` tarball (selection, fixes, overlays) into a tar stream;
`ext4` feeds that stream to `mke2fs -d -`. Import the submodules directly: this package imports
nothing, so `rfs --help` stays fast.

May import `rfs.script`, `rfs.host` and `rfs.errors`.
"""
