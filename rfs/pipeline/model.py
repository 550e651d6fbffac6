"""What a build is asked to do (`Options`) and what planning made of it (`Planned`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfs.graph.compiler import build_graph
from rfs.graph.planner import Action, Decision
from rfs.graph.steps import Facts, Step
from rfs.run.executors import Executor
from rfs.run.store import DEFAULT_SIZE_LIMIT, Store, default_cache_dir
from rfs.script.model import BuildScript
from rfs.script.package import Loaded

if TYPE_CHECKING:
    import networkx as nx

    from rfs.remote.config import RemoteSettings
    from rfs.remote.sync import RemoteCache
    from rfs.run.basefacts import DockerfileBase

RUN_LABEL = "org.rfs.run"
# "<host>:<pid>:<process start time>" of the rfs process that created a container, so a later
# build can tell the containers of a build that died (SIGKILL, a crashed engine restarted
# later) from those of a build still running, and remove only the former.
OWNER_LABEL = "org.rfs.owner"
# On every container of a `--keep-failed` build: what it leaves is left on purpose.
KEEP_LABEL = "org.rfs.keep"


@dataclass
class Options:
    """What the user asked for, independent of how it was asked (CLI, tests)."""

    package: Path
    output: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = DEFAULT_SIZE_LIMIT
    network: bool = True
    keep_failed: bool = False  # keep the container of a failed command for inspection
    remote: RemoteSettings | None = None  # remote caches to read and write (rfs.remote)
    no_cache: bool = False  # run every step; its result replaces the cached one
    rebuild: tuple[str, ...] = ()  # step ids to run again, with every step after them
    pull: bool = False  # look the base image's tag up in its registry again
    platform: str | None = None  # --platform: wins over container.platform
    # Several packages in one build: the image goes to `<output_dir>/<name>.<type>` when
    # `output` is not set (rfs build PKG... --output-dir DIR).
    output_dir: Path | None = None
    run_id: str | None = None  # the containers' run label; one per build, shared by packages


@dataclass
class Planned:
    """A compiled and planned build, ready to execute."""

    loaded: Loaded
    steps: list[Step]
    decisions: list[Decision]
    facts: Facts
    executor: Executor
    store: Store
    script_id: str
    previous: dict[str, Any] = field(default_factory=dict)
    remote: RemoteCache | None = None
    forced: dict[str, str] = field(default_factory=dict)  # step id -> why it runs regardless
    dockerfile: DockerfileBase | None = None  # a `container.dockerfile` base, as keyed
    _graph: nx.DiGraph | None = None

    @property
    def graph(self) -> nx.DiGraph:
        """The step graph (built on first use; also used to plan again after a failed
        remote download)."""
        if self._graph is None:
            self._graph = build_graph(self.steps)
        return self._graph

    @property
    def script(self) -> BuildScript:
        """The build script being built."""
        return self.loaded.script

    def to_run(self) -> list[Decision]:
        """The decisions whose steps will run."""
        return [d for d in self.decisions if d.action is Action.RUN]
