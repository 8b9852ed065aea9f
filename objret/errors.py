"""Errors objret raises for bad input or unreachable stores; each names what was wrong."""


class ObjretError(Exception):
    """Base class: an error a user can act on (bad input, missing artifact, unreachable store)."""


class StoreError(ObjretError):
    """A storage location (local folder or S3 prefix) could not be read or written."""


class BadFrameError(ObjretError):
    """An image or video frame could not be decoded."""


class ReportError(ObjretError):
    """A failure report is invalid; ``problems`` lists one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid failure report:\n" + "\n".join(f"  - {p}" for p in self.problems))
