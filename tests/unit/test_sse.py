"""Tests for the incremental Server-Sent Events parser in proxy.sse."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import DEFAULT_MAX_EVENT_BYTES, SSEEvent, SSEEventTooLarge, SSEParser

Fields = tuple[str, str, str | None, int | None]


def fields(events: Iterable[SSEEvent]) -> list[Fields]:
    return [(e.event, e.data, e.id, e.retry) for e in events]


def parse_chunks(chunks: Iterable[bytes], **kwargs: int) -> tuple[list[SSEEvent], bytes]:
    parser = SSEParser(**kwargs)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    assert parser.close() == []
    return events, parser.pending_bytes()


def parse(stream: bytes) -> list[SSEEvent]:
    events, pending = parse_chunks([stream])
    assert b"".join(e.raw for e in events) + pending == stream
    return events


def split_at(stream: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def reference_parse(stream: bytes) -> list[Fields]:
    """A deliberately naive, spec-literal parser working on the whole stream."""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    lines.pop()  # the last element is not terminated: an incomplete line
    out: list[Fields] = []
    seen, event, id_, retry = False, "", None, None
    data: list[str] = []
    for line in lines:
        if line == "":
            if seen:
                out.append((event or "message", "\n".join(data), id_, retry))
            seen, event, data, id_, retry = False, "", [], None, None
            continue
        seen = True
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            id_ = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return out


def check_chunked_matches_oneshot(stream: bytes, chunks: Sequence[bytes]) -> None:
    """Chunked parsing gives the one-shot results and preserves the raw bytes.

    Event boundaries (end offsets) are identical, except that an event ended
    by a CR that closed a chunk ends before the LF of that CRLF.
    """
    assert b"".join(chunks) == stream
    oneshot = parse(stream)
    events, pending = parse_chunks(chunks)
    assert b"".join(e.raw for e in events) + pending == stream
    assert fields(events) == fields(oneshot)
    assert fields(oneshot) == reference_parse(stream)
    boundaries = set()
    offset = 0
    for chunk in chunks:
        offset += len(chunk)
        boundaries.add(offset)
    end_chunked = end_oneshot = 0
    for got, want in zip(events, oneshot, strict=True):
        end_chunked += len(got.raw)
        end_oneshot += len(want.raw)
        if end_chunked != end_oneshot:
            assert end_chunked == end_oneshot - 1
            assert end_chunked in boundaries
            assert stream[end_chunked - 1 : end_oneshot] == b"\r\n"


# --- line endings -------------------------------------------------------------


def test_lf_line_endings() -> None:
    stream = b"event: greet\ndata: hello\n\ndata: world\n\n"
    events = parse(stream)
    assert fields(events) == [("greet", "hello", None, None), ("message", "world", None, None)]
    assert [e.raw for e in events] == [b"event: greet\ndata: hello\n\n", b"data: world\n\n"]


def test_crlf_line_endings() -> None:
    stream = b"event: greet\r\ndata: hello\r\n\r\ndata: world\r\n\r\n"
    events = parse(stream)
    assert fields(events) == [("greet", "hello", None, None), ("message", "world", None, None)]
    assert [e.raw for e in events] == [
        b"event: greet\r\ndata: hello\r\n\r\n",
        b"data: world\r\n\r\n",
    ]


def test_cr_line_endings() -> None:
    stream = b"data: a\rdata: b\r\rdata: c\r\r"
    events = parse(stream)
    assert fields(events) == [("message", "a\nb", None, None), ("message", "c", None, None)]
    assert [e.raw for e in events] == [b"data: a\rdata: b\r\r", b"data: c\r\r"]


def test_mixed_line_endings() -> None:
    events = parse(b"data: a\r\ndata: b\rdata: c\n\r\n")
    assert fields(events) == [("message", "a\nb\nc", None, None)]


def test_crlf_split_across_chunks_is_one_line_ending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n") == []
    # Had "\r" + "\n" counted as two line endings, "a" would have been dispatched.
    events = parser.feed(b"\r\n")
    assert fields(events) == [("message", "a\nb", None, None)]
    assert events[0].raw == b"data: a\r\ndata: b\r\n\r\n"
    assert parser.pending_bytes() == b""


def test_dispatching_cr_at_chunk_end_then_lf() -> None:
    parser = SSEParser()
    first = parser.feed(b"data: a\r\n\r")
    # The event is dispatched at once, without waiting for a possible LF.
    assert fields(first) == [("message", "a", None, None)]
    assert first[0].raw == b"data: a\r\n\r"
    assert parser.feed(b"\n") == []
    assert parser.pending_bytes() == b"\n"
    second = parser.feed(b"data: b\r\n\r\n")
    # The LF completing the CRLF did not form a blank line of its own.
    assert fields(second) == [("message", "b", None, None)]
    assert second[0].raw == b"\ndata: b\r\n\r\n"


def test_cr_at_chunk_end_followed_by_non_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    events = parser.feed(b"\r")
    assert fields(events) == [("message", "a", None, None)]
    assert events[0].raw == b"data: a\r\r"


# --- fields -------------------------------------------------------------------


def test_multiline_data_joined_with_newline() -> None:
    events = parse(b"data: first\ndata:second\ndata:\ndata:  indented\n\n")
    assert [e.data for e in events] == ["first\nsecond\n\n indented"]


def test_only_one_leading_space_is_stripped_and_colons_in_value_kept() -> None:
    events = parse(b'data:  {"a": "b:c"}\n\n')
    assert events[0].data == ' {"a": "b:c"}'


def test_id_and_retry() -> None:
    events = parse(b"id: 42\nretry: 1500\ndata: x\n\ndata: y\n\n")
    assert fields(events) == [("message", "x", "42", 1500), ("message", "y", None, None)]


def test_invalid_retry_and_id_with_nul_are_ignored() -> None:
    events = parse(b"retry: 15s\nretry: -1\nretry:\nid: a\x00b\ndata: x\n\n")
    assert fields(events) == [("message", "x", None, None)]


def test_empty_id_is_an_empty_string_not_none() -> None:
    assert [e.id for e in parse(b"id\n\nid:\n\n")] == ["", ""]


def test_later_fields_override_earlier_ones() -> None:
    events = parse(b"event: a\nevent: b\nid: 1\nid: 2\nretry: 1\nretry: 2\ndata: x\n\n")
    assert fields(events) == [("b", "x", "2", 2)]


def test_empty_event_name_means_message() -> None:
    assert [e.event for e in parse(b"event:\ndata: x\n\n")] == ["message"]


def test_field_without_colon_has_empty_value() -> None:
    events = parse(b"data\ndata\n\nevent\ndata: z\n\n")
    assert fields(events) == [("message", "\n", None, None), ("message", "z", None, None)]


def test_unknown_fields_are_ignored_but_block_is_returned() -> None:
    events = parse(b"foo: bar\nData: x\n\n")
    assert fields(events) == [("message", "", None, None)]
    assert events[0].raw == b"foo: bar\nData: x\n\n"


def test_invalid_utf8_is_replaced() -> None:
    events = parse(b"data: caf\xc3\xa9 \xff\n\n")
    assert events[0].data == "café \ufffd"


# --- comments, priming events, blank lines -----------------------------------


def test_comments_are_ignored_inside_events() -> None:
    events = parse(b": note\ndata: a\n:another: one\ndata: b\n\n")
    assert fields(events) == [("message", "a\nb", None, None)]
    assert events[0].raw == b": note\ndata: a\n:another: one\ndata: b\n\n"


def test_comment_only_keepalive_is_returned() -> None:
    events = parse(b":\n\n: ping\n\ndata: x\n\n")
    assert fields(events) == [
        ("message", "", None, None),
        ("message", "", None, None),
        ("message", "x", None, None),
    ]
    assert [e.raw for e in events] == [b":\n\n", b": ping\n\n", b"data: x\n\n"]


def test_mcp_priming_event_is_returned() -> None:
    stream = b"id: 0-abc\ndata: \n\nevent: message\nid: 1-abc\ndata: {}\n\n"
    events = parse(stream)
    assert fields(events) == [("message", "", "0-abc", None), ("message", "{}", "1-abc", None)]
    assert events[0].raw == b"id: 0-abc\ndata: \n\n"


def test_retry_only_event_is_returned() -> None:
    events = parse(b"retry: 3000\n\n")
    assert fields(events) == [("message", "", None, 3000)]


def test_extra_blank_lines_are_carried_by_the_next_event() -> None:
    parser = SSEParser()
    first = parser.feed(b"\n\ndata: a\n\n\n")
    assert [e.raw for e in first] == [b"\n\ndata: a\n\n"]
    assert parser.pending_bytes() == b"\n"
    second = parser.feed(b"\r\ndata: b\n\n")
    assert fields(second) == [("message", "b", None, None)]
    assert second[0].raw == b"\n\r\ndata: b\n\n"


# --- byte order mark ------------------------------------------------------------


def test_bom_at_stream_start_is_ignored() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    events = parse(stream)
    assert fields(events) == [("message", "x", None, None)]
    assert events[0].raw == stream


def test_bom_split_across_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b"\xef") == []
    assert parser.feed(b"\xbb") == []
    assert parser.pending_bytes() == b"\xef\xbb"
    events = parser.feed(b"\xbfevent: e\ndata: x\n\n")
    assert fields(events) == [("e", "x", None, None)]
    assert events[0].raw == b"\xef\xbb\xbfevent: e\ndata: x\n\n"


def test_bom_makes_field_name_unrecognised_only_when_not_at_start() -> None:
    # A BOM later in the stream is part of the field name, so "data" is unknown.
    events = parse(b"data: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert fields(events) == [("message", "a", None, None), ("message", "", None, None)]


def test_partial_bom_prefix_that_is_not_a_bom() -> None:
    events, pending = parse_chunks([b"\xef", b"\n\n"])
    assert fields(events) == [("message", "", None, None)]
    assert events[0].raw == b"\xef\n\n"
    assert pending == b""


# --- incremental behaviour ------------------------------------------------------

MULTI_EVENT_STREAM = (
    b"\xef\xbb\xbf: welcome\n\n"
    b"id: 0\ndata:\n\n"
    b'event: message\r\nid: 1\r\ndata: {"jsonrpc":"2.0",\r\ndata:  "id": 1}\r\n\r\n'
    b"retry: 500\rdata: caf\xc3\xa9\r\r"
    b"data\n:\n\n\n"
    b"event: end\ndata: done\r\n\r"
    b"\ndata: tail"
)


def test_multi_event_stream_oneshot() -> None:
    events = parse(MULTI_EVENT_STREAM)
    assert fields(events) == [
        ("message", "", None, None),
        ("message", "", "0", None),
        ("message", '{"jsonrpc":"2.0",\n "id": 1}', "1", None),
        ("message", "café", None, 500),
        ("message", "", None, None),
        ("end", "done", None, None),
    ]
    assert fields(events) == reference_parse(MULTI_EVENT_STREAM)


def test_split_at_every_position() -> None:
    for cut in range(len(MULTI_EVENT_STREAM) + 1):
        check_chunked_matches_oneshot(MULTI_EVENT_STREAM, split_at(MULTI_EVENT_STREAM, [cut]))


def test_split_at_every_pair_of_positions() -> None:
    n = len(MULTI_EVENT_STREAM)
    for first in range(n + 1):
        for second in range(first, n + 1, 7):
            chunks = split_at(MULTI_EVENT_STREAM, [first, second])
            check_chunked_matches_oneshot(MULTI_EVENT_STREAM, chunks)


def test_byte_at_a_time() -> None:
    chunks = [MULTI_EVENT_STREAM[i : i + 1] for i in range(len(MULTI_EVENT_STREAM))]
    check_chunked_matches_oneshot(MULTI_EVENT_STREAM, chunks)
    events, pending = parse_chunks(chunks)
    # The stream's last event ends "\r\n\r" + "\n": fed byte by byte, it is
    # dispatched on that CR, and the LF is buffered with the incomplete tail.
    assert pending == b"\ndata: tail"
    assert len(events) == 6
    # The extra blank line before it is carried at the start of its raw bytes.
    assert events[-1].raw == b"\nevent: end\ndata: done\r\n\r"


def test_events_are_returned_by_the_chunk_that_completes_them() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert [e.data for e in parser.feed(b"\ndata: b\n\ndata: c\n\ndata: d")] == ["a", "b", "c"]
    assert parser.pending_bytes() == b"data: d"
    assert [e.data for e in parser.feed(b"\n\n")] == ["d"]
    assert parser.pending_bytes() == b""


def test_empty_chunk_is_a_no_op() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.pending_bytes() == b"data: a\r"
    assert [e.raw for e in parser.feed(b"\n\n")] == [b"data: a\r\n\n"]


def test_close_discards_incomplete_event_but_keeps_its_bytes() -> None:
    parser = SSEParser()
    assert [e.data for e in parser.feed(b"data: a\n\ndata: incomplete\n")] == ["a"]
    assert parser.close() == []
    assert parser.pending_bytes() == b"data: incomplete\n"
    with pytest.raises(RuntimeError):
        parser.feed(b"\n")


def test_sse_event_defaults() -> None:
    event = SSEEvent(raw=b":\n\n")
    assert (event.event, event.data, event.id, event.retry) == ("message", "", None, None)
    with pytest.raises(AttributeError):
        event.data = "x"  # type: ignore[misc]


# --- size limit -------------------------------------------------------------------


def test_default_max_event_bytes() -> None:
    assert DEFAULT_MAX_EVENT_BYTES == 8 * 1024 * 1024
    assert SSEParser().max_event_bytes == DEFAULT_MAX_EVENT_BYTES


def test_incomplete_event_too_large() -> None:
    parser = SSEParser(max_event_bytes=64)
    assert parser.feed(b"data: " + b"x" * 50) == []
    with pytest.raises(SSEEventTooLarge, match="max_event_bytes=64") as info:
        parser.feed(b"x" * 20)
    assert isinstance(info.value, ValueError)


def test_complete_event_too_large_in_one_chunk() -> None:
    parser = SSEParser(max_event_bytes=64)
    assert len(parser.feed(b"data: " + b"x" * 56 + b"\n\n")) == 1  # exactly 64 bytes
    with pytest.raises(SSEEventTooLarge, match="max_event_bytes=64"):
        parser.feed(b"data: " + b"x" * 57 + b"\n\n")


def test_many_small_events_within_limit() -> None:
    stream = b"data: 0123456789\n\n" * 1000
    events, pending = parse_chunks([stream], max_event_bytes=32)
    assert len(events) == 1000
    assert pending == b""


def test_invalid_max_event_bytes() -> None:
    with pytest.raises(ValueError, match="positive"):
        SSEParser(max_event_bytes=0)


def test_long_line_in_many_chunks_is_parsed() -> None:
    payload = b"y" * 200_000
    stream = b"data: " + payload + b"\n\n"
    chunks = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    events, pending = parse_chunks(chunks)
    assert [e.data for e in events] == [payload.decode()]
    assert pending == b""


# --- property tests -------------------------------------------------------------

_values = st.text(
    alphabet=st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]),
    max_size=12,
)
_names = st.sampled_from(["data", "event", "id", "retry", "foo", "", "dat", "data "])
_eols = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def _lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "field", "field", "bare", "comment", "blank", "digits"]))
    eol = draw(_eols)
    if kind == "blank":
        return eol
    if kind == "comment":
        return b":" + draw(_values).encode() + eol
    if kind == "bare":
        return draw(_names).encode() + eol
    if kind == "digits":
        return b"retry:" + str(draw(st.integers(0, 10**6))).encode() + eol
    sep = draw(st.sampled_from([":", ": ", ":  "]))
    return (draw(_names) + sep + draw(_values)).encode() + eol


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    body = b"".join(draw(st.lists(_lines(), max_size=30)))
    prefix = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf"]))
    tail = draw(st.sampled_from([b"", b"", b"data: partial", b"\r", b"\xef"]))
    return prefix + body + tail


@st.composite
def _stream_and_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(_streams())
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, split_at(stream, cuts)


@settings(max_examples=400, deadline=None)
@given(_stream_and_chunks())
def test_property_random_chunking_matches_oneshot(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    check_chunked_matches_oneshot(stream, chunks)


@settings(max_examples=200, deadline=None)
@given(_streams(), st.integers(1, 64), st.integers(1, 16))
def test_property_size_limit(stream: bytes, limit: int, step: int) -> None:
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    # Largest event or buffered remainder seen by an effectively unlimited parser.
    unlimited = SSEParser()
    largest = 0
    for chunk in chunks:
        largest = max([largest, *(len(e.raw) for e in unlimited.feed(chunk))])
        largest = max(largest, len(unlimited.pending_bytes()))

    parser = SSEParser(max_event_bytes=limit)
    events: list[SSEEvent] = []
    raised = False
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
    except SSEEventTooLarge:
        raised = True
    assert raised == (largest > limit)
    if not raised:
        assert b"".join(e.raw for e in events) + parser.pending_bytes() == stream
