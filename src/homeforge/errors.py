"""User-facing errors: what went wrong, where, and how to fix it.

Every error a user can cause by bad input is a ``HomeforgeError``; the CLI prints it in
plain words and exits with a non-zero code, without a traceback.
"""

from __future__ import annotations


class HomeforgeError(Exception):
    """An error caused by input the user can fix."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


class ConfigError(HomeforgeError):
    """A configuration that does not validate; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str], *, where: str | None = None):
        self.problems = problems
        what = f"invalid configuration ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n" + "\n".join(
            f"  - {p}" for p in problems
        )
        super().__init__(what, where=where, fix="correct the fields above (see `homeforge config show STAGE`)")


class ArtifactError(HomeforgeError):
    """An artifact directory that is missing, incomplete or corrupted."""


class EgressError(HomeforgeError, ConnectionRefusedError):
    """An outbound connection to a non-loopback address was refused."""
