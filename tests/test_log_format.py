"""``--log-format json``: one JSON object per line with time, level, logger, message, extras."""

from __future__ import annotations

import json
import logging

import pytest

from edgefleet._cli_log import JsonFormatter, setup
from edgefleet.cli import build_parser


def test_a_record_is_one_json_line_with_its_extra_fields() -> None:
    record = logging.LogRecord("edgefleet.agent", logging.WARNING, __file__, 1,
                               "dropped %d from %s", (3, "dev-a"), None)  # fmt: skip
    record.device = "dev-a"
    record.blob = object()  # not JSON: written as its repr
    line = JsonFormatter().format(record)
    assert "\n" not in line
    d = json.loads(line)
    assert (d["level"], d["logger"], d["message"], d["device"]) == (
        "WARNING", "edgefleet.agent", "dropped 3 from dev-a", "dev-a")
    assert d["time"].endswith("+00:00") and d["blob"].startswith("<object")


def test_a_traceback_stays_on_the_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    d = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in d["exc"]


@pytest.mark.parametrize("argv", [["agent", "run", "--home", "h", "--log-format", "json"],
                                  ["coordinator", "serve", "--home", "h", "--log-format", "json"]])
def test_the_daemons_take_the_flag(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).log_format == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:4], "--log-format", "xml"])


def test_setup_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup(logging.INFO, "xml")
