"""Typed stub of the native module ``balans._balans`` (use the functions of ``balans``)."""

from typing import Any, Callable, Optional

from typing_extensions import CapsuleType

__version__: str

#: Receives ``(kind, text, number)`` progress events: kind is "start", "progress",
#: "finish", "warning" or "step".
Callback = Callable[[str, Optional[str], Optional[int]], None]

class ArrowStream:
    """A result table, exported once through the Arrow C stream interface."""

    def __arrow_c_stream__(self, requested_schema: Optional[object] = None) -> CapsuleType: ...

def correct(
    data: Any,
    batch: list[str],
    method: str = "balans",
    options: Optional[dict[str, Any]] = None,
    callback: Optional[Callback] = None,
) -> ArrowStream: ...
def evaluate(
    data: Any,
    batch: list[str],
    label: str,
    options: Optional[dict[str, Any]] = None,
    callback: Optional[Callback] = None,
) -> str: ...
def preprocess(
    data: Any,
    options: Optional[dict[str, Any]] = None,
    callback: Optional[Callback] = None,
) -> tuple[ArrowStream, str]: ...
def train(
    data: Any,
    batch: str,
    label: str,
    output: str,
    model: str = "abra",
    options: Optional[dict[str, Any]] = None,
    callback: Optional[Callback] = None,
) -> str: ...
def inspect(
    data: Any,
    batch: list[str] = ...,
    options: Optional[dict[str, Any]] = None,
) -> str: ...
def sql(
    query: str,
    tables: Optional[dict[str, Any]] = None,
    options: Optional[dict[str, Any]] = None,
) -> ArrowStream: ...
