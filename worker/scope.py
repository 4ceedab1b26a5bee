"""Site files decoded as the worker decodes them: its filters, then the serving path."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from serving.decode import DecodeError, grayscale_pixels
from serving.header import Decoded, header_age, header_view
from serving.image import preprocess
from worker import filters


def decode_site_file(path: Path) -> Decoded:
    """A site's DICOM file through the worker's filters and decoding (`pneumo accept`, `adapt`)."""
    try:
        dataset = dcmread(path)
    except Exception as error:
        return Decoded(None, f"not a readable DICOM file: {type(error).__name__}")
    age, view = header_age(dataset), header_view(dataset)
    reason = filters.ignore_reason(dataset) or filters.failure_reason(dataset)
    if reason:
        return Decoded(None, reason, age, view)
    try:
        return Decoded(preprocess(grayscale_pixels(dataset)), None, age, view)
    except (DecodeError, ValueError) as error:
        return Decoded(None, str(error)[:500], age, view)
    except Exception as error:  # a decoder's own failure: that file's reason, not the whole report
        return Decoded(None, f"pixel data could not be decoded: {type(error).__name__}", age, view)
