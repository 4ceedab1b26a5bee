"""Which C-STORE answers mean the SR is stored: pynetdicom's status categories (success and every
DICOM warning, 0xB000-0xBFFF and the general 0x0001, 0x0107, 0x0116); anything else is a failure
that is retried and recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from core.settings import PeerAddress
from worker import delivery

STORED = [0x0000, 0xB000, 0xB007, 0xBFFF, 0x0001, 0x0107, 0x0116]
NOT_STORED = [0xA700, 0xA900, 0xC000, 0xC211, 0x0110, 0x0122, 0xFE00, 0xFF00, 0xD000]


class _Association:
    def __init__(self, status: int) -> None:
        self.status = status

    def send_c_store(self, _dataset) -> Dataset:
        answer = Dataset()
        answer.Status = self.status
        return answer

    def release(self) -> None:
        pass


def _send(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "associate", lambda *_args: _Association(status))
    monkeypatch.setattr(delivery, "dcmread", lambda path: Dataset())
    delivery.send_sr(Path("sr.dcm"), PeerAddress("PACS@127.0.0.1:104"), "PNEUMO")


@pytest.mark.parametrize("status", STORED)
def test_success_and_warnings_are_stored(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _send(status, monkeypatch)


@pytest.mark.parametrize("status", NOT_STORED)
def test_failures_and_unknown_answers_raise_with_the_status(
    status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(delivery.DeliveryError, match=f"0x{status:04X}"):
        _send(status, monkeypatch)
