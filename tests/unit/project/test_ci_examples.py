"""The CI examples of examples/ci/ (docs/shards.md) are valid YAML, and the rfs command each
runs is one rfs accepts, for every shard of its matrix or index: parsed by rfs's own argument
parser, its --shard checked as `rfs build` checks it, its packages present in this repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from rfs.commands import make_parser
from rfs.commands.build import shard_of
from tests.cacheservers import NGINX_CONF, SHIPPED_LISTEN

ROOT = Path(__file__).resolve().parents[3]
CI = ROOT / "examples" / "ci"


def rfs_args(command: str, values: dict[str, str]) -> list[str]:
    """The arguments of the `rfs` command in a shell `command`, its expressions replaced."""
    for pattern, value in values.items():
        command = re.sub(pattern, value, command)
    words = shlex.split(command)
    words = words[words.index("rfs") + 1 :]
    return words[: words.index(">")] if ">" in words else words


def accepted(args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The parsed command line, after the checks `rfs build` makes of --shard."""
    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv("RFS_CONFIG", str(tmp_path / "config.toml"))
    for name in ("RFS_CACHE_TO", "RFS_CACHE_FROM", "RFS_CACHE_SCOPE"):
        monkeypatch.delenv(name, raising=False)
    parsed = make_parser(args).parse_args(args)
    assert parsed.verb == "build"
    for package in parsed.package:
        assert (ROOT / package / "build.toml").is_file(), package
    return parsed


def test_github_actions_matrix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    flow = yaml.safe_load((CI / "github-actions-shards.yml").read_text())
    job = flow["jobs"]["images"]
    shards = job["strategy"]["matrix"]["shard"]
    assert job["strategy"]["fail-fast"] is False  # the others cover for a failed shard
    (run,) = [s["run"] for s in job["steps"] if "rfs build" in s.get("run", "")]
    seen = []
    for shard in shards:
        args = rfs_args(
            run,
            {
                r"\$\{\{ matrix\.shard \}\}": str(shard),
                r"\$\{\{ vars\.RFS_CACHE_URL \}\}": "http://cache.example:8080/",
                r"\$\{\{ github\.ref_name \}\}": "main",
            },
        )
        assert "${{" not in " ".join(args)
        found = shard_of(accepted(args, monkeypatch, tmp_path))
        assert found is not None and found.count == len(shards)
        seen.append(found.index)
    assert sorted(seen) == list(range(1, len(shards) + 1))  # every shard, once


def test_kubernetes_indexed_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((CI / "k8s-indexed-job.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    job, service = by_kind["Job"], by_kind["Service"]
    assert job["spec"]["completionMode"] == "Indexed"
    count = job["spec"]["completions"]
    (rfs,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "rfs"]
    command = rfs["command"][-1]
    seen = []
    for index in range(count):  # JOB_COMPLETION_INDEX: 0..N-1
        args = rfs_args(command, {r"\$\(\(JOB_COMPLETION_INDEX \+ 1\)\)": str(index + 1)})
        parsed = accepted(args, monkeypatch, tmp_path)
        found = shard_of(parsed)
        assert found is not None and found.count == count
        seen.append(found.index)
        url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/"
        assert parsed.cache_to == url  # the Service of the cache below
    assert seen == list(range(1, count + 1))
    # The cache runs the shipped nginx file, its loopback listen replaced.
    (nginx,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert f"s/{SHIPPED_LISTEN}/listen 8080;/" in nginx["command"][-1]
    assert SHIPPED_LISTEN in NGINX_CONF.read_text()
