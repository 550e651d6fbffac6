"""Reading a command's output stream: frames demultiplexed, and an engine's error in place of
frames told apart from output."""

from __future__ import annotations

import io
import struct

import pytest

from rfs.engine.containers import _frames, _NotFrames


def frame(stream_id: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream_id, len(data)) + data


def test_frames_are_demultiplexed() -> None:
    raw = io.BytesIO(frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"more"))
    assert list(_frames(raw)) == [(1, b"out\n"), (2, b"err\n"), (1, b"more")]


def test_an_error_in_place_of_output_is_not_taken_for_output() -> None:
    """What Podman 4.3 once answered to the logs request of a command that had just ended."""
    body = (
        b'{"cause":"no such process","message":"failed to obtain logs for Container '
        b'\'fe19\': read /proc/19185/cgroup: no such process","response":500}\n'
    )
    with pytest.raises(_NotFrames, match="failed to obtain logs"):
        list(_frames(io.BytesIO(body)))
    with pytest.raises(_NotFrames):  # after good frames too
        list(_frames(io.BytesIO(frame(1, b"ok\n") + body)))
