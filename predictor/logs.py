"""Logging as kserve sets it up (its format, its handlers), or the same handlers writing one JSON object
per line (`--log_format json`) for a cluster's log pipeline; either way with the request id
(`request_ids.RequestLog`) on each record logged while a request is handled.

JSON lines come from python-json-logger's formatter, put in place of each of kserve's formatters:
kserve's configuration stays the one source of which logger writes where, at what level.
"""

import copy
import logging
from typing import Optional

from kserve import logging as kserve_logging

from .protocol.request_ids import RequestLog

LOG_FORMATS = ("text", "json")
# Renamed for log pipelines' usual field names; the request id is the record's `request_id`.
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}


def json_config() -> dict:
    """kserve's logging configuration with every formatter writing JSON."""
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    for name in config["formatters"]:
        config["formatters"][name] = {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS,
                                      "rename_fields": JSON_RENAMED, "timestamp": False}
    return config


def configure(log_format: str, log_config_file: Optional[str], package: str) -> None:
    """kserve's logging (a --log_config_file of the user's wins over --log_format); our package's
    loggers, the libraries' that bring their own handlers, and Python's warnings on kserve's handlers;
    the request ids on the lines written through them."""
    kserve_logging.configure_logging(log_config_file or (json_config() if log_format == "json" else None))
    logging.captureWarnings(True)  # a library's warning is a log record too, not a bare line on stderr
    # transformers and nncf bring handlers of their own, in formats of their own: theirs too go through kserve's.
    for name in (package, "py.warnings", "transformers", "nncf"):
        ours = logging.getLogger(name)
        ours.handlers = kserve_logging.logger.handlers
        ours.setLevel(kserve_logging.logger.level)
        ours.propagate = False
    for handler in kserve_logging.logger.handlers:  # not the access and latency lines: one line per error
        handler.addFilter(RequestLog())
