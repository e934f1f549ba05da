"""User-facing errors.

Every problem the user can fix (bad profile, missing model, corrupt file, too
little memory...) is raised as :class:`EdgekdError`. The CLI prints it as one
message with the fix and exits with code 2; the Python API lets it propagate.
Anything else is a bug in edgekd and keeps its traceback.
"""

from __future__ import annotations


class EdgekdError(Exception):
    """A problem with the user's input, reported as one message and a fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None, details: list[str] | None = None):
        self.problem = problem
        self.fix = fix
        self.details = list(details or [])
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.problem]
        lines += [f"  - {d}" for d in self.details]
        if self.fix:
            lines.append(f"fix: {self.fix}")
        return "\n".join(lines)
