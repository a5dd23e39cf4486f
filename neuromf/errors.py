"""Errors a user can fix. The CLI prints them as one line each and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a wrong run-spec, a missing or corrupt file. Never shown with a traceback."""

    exit_code = 2

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
