"""Every log record an objret process makes (the CLI, served runs, workers; those Prefect sends to its server
included) goes through two rules: URL credentials in its message are redacted (flows.redaction), and an
ObjretError carries no traceback. An ObjretError is a user's problem with a message that says what to do (a full
disk, a damaged file, a bad report); Prefect logs every failed task and flow with its traceback, which would bury
that one line under forty of engine frames. Other exceptions (bugs) keep theirs.
"""

from __future__ import annotations

import logging

from objret.config import redact_credentials
from objret.errors import ObjretError


def install() -> None:
    base = logging.getLogRecordFactory()
    if getattr(base, "objret", False):
        return

    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        message = record.getMessage()
        clean = redact_credentials(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and isinstance(record.exc_info[1], ObjretError):
            record.exc_info = None
        return record

    factory.objret = True
    logging.setLogRecordFactory(factory)
