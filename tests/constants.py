"""Names every test shares: the busybox base image and this test run's id, label and tag prefix.

They live here, not in tests/conftest.py, so that every importer sees one value: pytest loads
the conftest as the module `conftest`, and `from tests.conftest import …` would load a second
copy with a run id of its own.
"""

from __future__ import annotations

import uuid

BUSYBOX = "rfs-test/busybox:1"
BUSYBOX_NAME, BUSYBOX_TAG = BUSYBOX.split(":")
# BUSYBOX as a build script's `image` value, and as its whole `image = …` line
BUSYBOX_TABLE = f'{{ name = "{BUSYBOX_NAME}", tag = "{BUSYBOX_TAG}" }}'
BUSYBOX_IMAGE = f"image = {BUSYBOX_TABLE}"

RUN_ID = uuid.uuid4().hex[:12]
RUN_LABEL_KEY = "org.rfs.test-run"
TMP_REPO_PREFIX = f"rfs-test-tmp/{RUN_ID}-"
# The same busybox for linux/arm64/v8 (scripts/make-base-images.sh): runs under emulation.
BUSYBOX_ARM64 = "rfs-test/busybox-arm64:1"
# A bootable arm64 Debian (minbase, systemd-sysv, udev) for linux/arm64/v8: the arm64 boot test.
DEBIAN_ARM64 = "rfs-test/debian-arm64:1"
