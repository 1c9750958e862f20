import io

from edgefleet.progress import ProgressLine


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_draws_on_a_terminal_and_ends_the_line() -> None:
    out = Tty()
    line = ProgressLine(out, min_interval=0.0)
    line("download", 512, 1024)
    line("download", 1024, 1024)
    text = out.getvalue()
    assert "\rdownload" in text and " 50.0%" in text and "100.0%" in text
    assert text.endswith("\n")


def test_progress_line_is_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    ProgressLine(out)("download", 1, 2)
    assert out.getvalue() == ""


def test_progress_line_rate_limits_intermediate_updates() -> None:
    out = Tty()
    line = ProgressLine(out, min_interval=3600)
    for done in range(1, 100):
        line("download", done, 100)
    assert out.getvalue().count("\r") == 1  # the first draw only; the rest within the interval
