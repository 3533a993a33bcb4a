"""Incremental, pure (no I/O) parser for ``text/event-stream`` bodies.

The proxy forwards an upstream's Server-Sent Events stream byte for byte while
watching the events go by.  :class:`SSEParser` is fed the original chunks and
returns each completed :class:`SSEEvent` together with the exact bytes it was
made of, so the caller can forward at event granularity without re-encoding
anything.

Parsing follows the WHATWG HTML "event stream interpretation" rules:

* lines end with CRLF, LF or CR (a CR that ends one chunk and an LF that starts
  the next are one line ending, not two);
* a blank line dispatches the event; lines starting with ``:`` are comments;
* ``field:value`` strips one leading space from the value; a line without a
  colon is a field name with an empty value; unknown fields are ignored;
* ``data`` lines are joined with ``"\\n"``; ``id`` values containing NUL are
  ignored; ``retry`` is honoured only when it is all ASCII digits;
* a UTF-8 byte order mark at the very start of the stream is ignored;
* text is decoded as UTF-8 with replacement characters.

Unlike a browser, the parser also returns blocks that a browser would not
dispatch (comment-only keep-alives such as ``b":\\n\\n"``, MCP "priming events"
that carry an ``id`` and empty ``data``, blocks of unknown fields), because
their bytes still have to be forwarded.  Such events have ``data == ""``.

Raw-byte invariant: the concatenation of ``raw`` of every event returned so far
plus :meth:`SSEParser.pending_bytes` is exactly the bytes fed so far.  Nothing
is lost, duplicated or reordered.  Two consequences worth knowing:

* Blank lines that do not end an event (e.g. extra blank lines between events)
  are not events; their bytes are carried at the start of the next event's
  ``raw`` (or stay in ``pending_bytes``).
* An event is dispatched as soon as its terminating line ending is seen.  When
  that is a CR at the very end of a chunk, the LF that may follow in the next
  chunk completes the CRLF; it is then the first byte of the next event's
  ``raw``.  Field values never depend on where the chunks were split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEEvent", "SSEEventTooLarge", "SSEParser"]

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024

_EOL = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"
_COLON = 0x3A
_CR = 0x0D
_LF = 0x0A


class SSEEventTooLarge(ValueError):
    """An event (complete or still buffered) is larger than ``max_event_bytes``."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One event block of the stream.

    ``raw`` is the exact original bytes of the block, including its terminating
    blank line.  ``id`` is this block's own ``id:`` field (not the stream's
    "last event ID"), or None when the block has none.
    """

    raw: bytes
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Feed chunks of an event stream in order; get back completed events.

    After :class:`SSEEventTooLarge` has been raised the parser's state is
    unspecified and it must be discarded (the stream should be aborted).
    """

    __slots__ = (
        "_bom_done",
        "_buf",
        "_closed",
        "_data",
        "_event_type",
        "_has_lines",
        "_id",
        "_line_start",
        "_max_event_bytes",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes <= 0:
            raise ValueError(f"max_event_bytes must be positive, got {max_event_bytes}")
        self._max_event_bytes = max_event_bytes
        # Bytes of the current, incomplete event (plus any blank lines before it).
        self._buf = bytearray()
        # Offset in _buf of the first unparsed line; _buf[_line_start:] holds no
        # line terminator, so scanning resumes at the end of _buf.
        self._line_start = 0
        self._bom_done = False
        # The last byte parsed was a CR ending a line; an LF next completes it.
        self._skip_lf = False
        self._closed = False
        self._has_lines = False
        self._event_type = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None

    @property
    def max_event_bytes(self) -> int:
        return self._max_event_bytes

    def pending_bytes(self) -> bytes:
        """The buffered bytes not yet part of any returned event.

        At end of stream the caller forwards these to preserve the raw stream.
        """
        return bytes(self._buf)

    def close(self) -> list[SSEEvent]:
        """Mark the end of the stream.

        Per the WHATWG spec an incomplete event (one without a terminating
        blank line) is discarded at end of stream, so this always returns [].
        Its bytes remain available from :meth:`pending_bytes` so the caller can
        still forward them.  Feeding after close raises RuntimeError.
        """
        self._closed = True
        return []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk`` and return every event it completes, in order.

        Raises :class:`SSEEventTooLarge` if an event (complete, or still
        incomplete after this chunk) is larger than ``max_event_bytes``.
        """
        if self._closed:
            raise RuntimeError("SSEParser.feed() called after close()")
        if not chunk:
            return []
        buf = self._buf
        # Parse the chunk in place when nothing is buffered (the common case:
        # upstreams usually write whole events), so raw slices need no copy.
        data: bytes | bytearray
        if buf:
            buf += chunk
            data = buf
            scan = len(buf) - len(chunk)
        else:
            data = chunk
            scan = 0
        pos = self._line_start

        if not self._bom_done:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._keep_tail(data, 0, 0)
                return []
            self._bom_done = True
            if data.startswith(_BOM):
                pos = scan = len(_BOM)

        if self._skip_lf:
            # The previous chunk ended with a CR line ending; this chunk is
            # non-empty, so we now know whether it was a CRLF.
            self._skip_lf = False
            if data[pos] == _LF:
                pos += 1
            scan = pos

        events: list[SSEEvent] = []
        event_start = 0
        end = len(data)
        limit = self._max_event_bytes
        search = _EOL.search
        while (m := search(data, scan)) is not None:
            line_end, nxt = m.span()
            if line_end == pos:
                # Blank line: dispatch, unless no line of an event precedes it.
                if self._has_lines:
                    if nxt - event_start > limit:
                        raise SSEEventTooLarge(self._too_large(nxt - event_start, "an"))
                    # bytes(x) of a bytes slice is that same object: no copy.
                    events.append(self._dispatch(bytes(data[event_start:nxt])))
                    event_start = nxt
            else:
                self._process_line(data[pos:line_end])
            pos = scan = nxt
        if pos == end and end > 0 and data[end - 1] == _CR:
            self._skip_lf = True

        if end - event_start > limit:
            raise SSEEventTooLarge(self._too_large(end - event_start, "a buffered incomplete"))
        self._keep_tail(data, event_start, pos)
        return events

    def _keep_tail(self, data: bytes | bytearray, event_start: int, line_start: int) -> None:
        """Store ``data[event_start:]`` as the buffer for the next feed."""
        if data is self._buf:
            del self._buf[:event_start]
        else:
            self._buf = bytearray(data[event_start:])
        self._line_start = line_start - event_start

    def _too_large(self, size: int, what: str) -> str:
        return (
            f"SSE stream has {what} event of at least {size} bytes, more than "
            f"max_event_bytes={self._max_event_bytes}"
        )

    def _process_line(self, line: bytes | bytearray) -> None:
        self._has_lines = True
        if line[0] == _COLON:
            return  # comment
        colon = line.find(b":")
        value: bytes | bytearray
        if colon < 0:
            name = line
            value = b""
        else:
            name = line[:colon]
            start = colon + 1
            if line[start : start + 1] == b" ":
                start += 1
            value = line[start:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():  # bytes.isdigit(): ASCII digits only
            self._retry = int(value)
        # Any other field name is ignored, as the spec requires.

    def _dispatch(self, raw: bytes) -> SSEEvent:
        event = SSEEvent(
            raw=raw,
            event=self._event_type or "message",
            data="\n".join(self._data),
            id=self._id,
            retry=self._retry,
        )
        self._has_lines = False
        self._event_type = ""
        self._data = []
        self._id = None
        self._retry = None
        return event
