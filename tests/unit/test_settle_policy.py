"""Tests for proxy.settle.billable and token_count: which final responses are charged, and for
how many tokens."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import MAX_BATCH
from proxy.settle import MAX_TOKENS_PER_CALL, billable, token_count


def response(**fields: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, **fields}


@pytest.mark.parametrize("bill_tool_errors", [False, True])
def test_rpc_error_is_never_billed(bill_tool_errors: bool) -> None:
    msg = response(error={"code": -32603, "message": "boom"})
    assert billable(msg, bill_tool_errors) == (False, "rpc_error")


@pytest.mark.parametrize("bill_tool_errors", [False, True])
def test_normal_result_is_billed(bill_tool_errors: bool) -> None:
    msg = response(result={"content": [{"type": "text", "text": "hi"}]})
    assert billable(msg, bill_tool_errors) == (True, "ok")


@pytest.mark.parametrize("is_error", [False, None, "true", 1])
def test_only_literal_true_is_error_counts_as_tool_error(is_error: Any) -> None:
    msg = response(result={"content": [], "isError": is_error})
    assert billable(msg, False) == (True, "ok")


def test_tool_error_not_billed_by_default() -> None:
    msg = response(result={"content": [], "isError": True})
    assert billable(msg, False) == (False, "tool_error")


def test_tool_error_billed_when_configured() -> None:
    msg = response(result={"content": [], "isError": True})
    assert billable(msg, True) == (True, "tool_error")


@pytest.mark.parametrize("bill_tool_errors", [False, True])
def test_input_required_is_not_billed(bill_tool_errors: bool) -> None:
    msg = response(result={"resultType": "input_required", "inputRequests": {}})
    assert billable(msg, bill_tool_errors) == (False, "input_required")


def test_input_required_wins_over_is_error() -> None:
    msg = response(result={"resultType": "input_required", "isError": True})
    assert billable(msg, True) == (False, "input_required")


def test_complete_result_type_is_billed() -> None:
    msg = response(result={"resultType": "complete", "content": []})
    assert billable(msg, False) == (True, "ok")


@pytest.mark.parametrize("result", [None, "text", 5, ["a"]])
def test_non_dict_result_is_billed(result: Any) -> None:
    assert billable(response(result=result), False) == (True, "ok")


def test_error_wins_over_result() -> None:
    msg = response(result={"content": []}, error={"code": 1, "message": "x"})
    assert billable(msg, True) == (False, "rpc_error")


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (0, 0),
        (1234, 1234),
        (MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_CALL),
        (MAX_TOKENS_PER_CALL + 1, None),  # an upstream's mistake: Stripe would refuse the sum
        (2**64, None),  # would not fit the spool's column
        (-1, None),
        (True, None),
        (12.5, None),
        ("12", None),
    ],
)
def test_token_count_is_a_bounded_whole_number(value: Any, tokens: int | None) -> None:
    message = response(result={"content": [], "_meta": {"tokens": value}})
    assert token_count(message, "tokens") == tokens


def test_a_full_batch_of_maximal_token_counts_fits_stripes_fifteen_digits() -> None:
    assert len(str(MAX_BATCH * MAX_TOKENS_PER_CALL)) <= 15
