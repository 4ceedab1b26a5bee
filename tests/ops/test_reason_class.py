"""Reasons grouped for `pneumo status` and metrics keep their whole head: a decode failure names
its transfer syntax, which a 60-character cut left open mid-parenthesis."""

from __future__ import annotations

from pydicom.uid import UID

from ops.monitoring import reason_class


def test_every_transfer_syntax_name_survives_in_a_decode_reason_class() -> None:
    from pydicom.uid import AllTransferSyntaxes

    for uid in AllTransferSyntaxes:
        reason = f"pixel data could not be decoded ({UID(uid).name}): broken data stream\\nline two"
        assert reason_class(reason) == f"pixel data could not be decoded ({UID(uid).name})"


def test_out_of_scope_reasons_group_by_rule() -> None:
    assert reason_class("out of scope: patient age above the validated range 1-5 years") == \
        "out of scope (patient age)"
    assert reason_class(None) == "unknown"
