"""The platform a build asks for, checked before anything runs: the host can run its programs,
and the base image is of that platform."""

from __future__ import annotations

from rfs.errors import EnvironmentProblem
from rfs.script.model import BuildScript


def check_emulation(script: BuildScript) -> None:
    """Fail before anything runs when the host cannot run the platform's programs."""
    from rfs.run.checks import SETUP_HINT, emulation_problem

    why = emulation_problem(script)
    if why is not None:
        raise EnvironmentProblem(f"container.platform: {why}", hint=SETUP_HINT)


def check_platform(script: BuildScript, found: str) -> None:
    """Refuse a base image of another platform than the one asked for: there is no registry
    to resolve the base for it, and commands would run as the image's platform."""
    c = script.container
    if c.platform is None:
        return
    from rfs.script.platform import matches

    if not found or not matches(c.platform, found):
        raise EnvironmentProblem(
            f"container.platform: the base image {c.base_label} is "
            f"{found or 'of a platform the engine does not name'}, not {c.platform}",
            hint=f"make or load a {c.platform} base image, or build for the base's platform "
            "(container.platform, --platform)",
        )
