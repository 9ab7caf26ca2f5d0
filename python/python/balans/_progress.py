"""Progress display and warnings of a running job (driven by the engine's events)."""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional


class BalansWarning(UserWarning):
    """A warning from the engine (the CLI prints these as ``warning: ...`` lines)."""


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def default_progress() -> bool:
    """Progress is on by default when stderr is a terminal or in a Jupyter notebook."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or _in_notebook()


class _TextBar:
    """A minimal one-line bar on stderr, used when tqdm is not installed."""

    def __init__(self, desc: str, total: Optional[int]) -> None:
        self.desc, self.total, self.n = desc, total, 0
        self._draw()

    def _draw(self, end: str = "") -> None:
        if self.total:
            width = 30
            filled = int(width * min(self.n, self.total) / self.total)
            bar = "=" * filled + " " * (width - filled)
            line = f"\r{self.desc:>8} [{bar}] {self.n}/{self.total}"
        else:
            line = f"\r{self.desc:>8} {self.n}"
        sys.stderr.write(line + end)
        sys.stderr.flush()

    def update_to(self, n: int) -> None:
        self.n = n
        self._draw()

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        self._draw("\n")


class Reporter:
    """Receives ``(kind, text, number)`` events from the engine while a job runs.

    Warnings always become :class:`BalansWarning`; with ``enabled``, stages are shown as
    tqdm bars (``tqdm.auto``, so they render in Jupyter) or, without tqdm, as a text bar on
    stderr, and step messages are printed to stderr.
    """

    def __init__(self, enabled: Optional[bool]) -> None:
        self.enabled = default_progress() if enabled is None else bool(enabled)
        self.bar: Any = None

    def _open(self, stage: str, total: Optional[int]) -> Any:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _TextBar(stage, total)
        return tqdm(desc=stage, total=total, unit="", leave=True)

    def __call__(self, kind: str, text: Optional[str], number: Optional[int]) -> None:
        if kind == "warning":
            warnings.warn(text or "", BalansWarning, stacklevel=3)
            return
        if not self.enabled:
            return
        if kind == "start":
            self.close()
            self.bar = self._open(text or "", number)
        elif kind == "progress" and self.bar is not None and number is not None:
            if hasattr(self.bar, "update_to"):
                self.bar.update_to(number)
            else:
                self.bar.update(number - self.bar.n)
            if text:
                self.bar.set_postfix_str(text)
        elif kind == "finish":
            self.close()
        elif kind == "step":
            print(f"balans: {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
