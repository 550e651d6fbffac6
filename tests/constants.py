"""Names every test shares: the busybox base image and this test run's id, label and tag prefix.

They live here, not in tests/conftest.py, so that every importer sees one value: pytest loads
the conftest as the module `conftest`, and `from tests.conftest import …` would load a second
copy with a run id of its own.
"""

from __future__ import annotations

import uuid

BUSYBOX = "rfs-test/busybox:1"
BUSYBOX_NAME, BUSYBOX_TAG = BUSYBOX.split(":")
# `image = { … }` in a build script's [container] table, naming BUSYBOX
BUSYBOX_IMAGE = f'image = {{ name = "{BUSYBOX_NAME}", tag = "{BUSYBOX_TAG}" }}'

RUN_ID = uuid.uuid4().hex[:12]
RUN_LABEL_KEY = "org.rfs.test-run"
TMP_REPO_PREFIX = f"rfs-test-tmp/{RUN_ID}-"
