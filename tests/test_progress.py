"""Progress bars: on stderr when stdout is a terminal, never with --quiet or when piped."""

import io

from mmfree_fpga import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _bar_text(monkeypatch, tty: bool, quiet: bool) -> str:
    out, err = (_Tty() if tty else io.StringIO()), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    progress.set_quiet(quiet)
    try:
        assert list(progress.track(range(5), "checking tensors", unit="tensor")) == list(range(5))
        with progress.Progress("loading weights", unit="B") as bar:
            for done in (0, 512, 1024):
                bar(done, 1024)
    finally:
        progress.set_quiet(False)
    assert out.getvalue() == ""          # bars never go to stdout
    return err.getvalue()


def test_bars_on_a_terminal(monkeypatch):
    text = _bar_text(monkeypatch, tty=True, quiet=False)
    assert "checking tensors" in text and "/5 [" in text
    assert "loading weights" in text and "/1024 [" in text


def test_no_bars_when_quiet_or_piped(monkeypatch):
    assert _bar_text(monkeypatch, tty=True, quiet=True) == ""
    assert _bar_text(monkeypatch, tty=False, quiet=False) == ""
