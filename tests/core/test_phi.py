"""core.phi: what libraries quote is withheld from log records; our own messages are kept."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from pydicom.valuerep import DA

from core import phi


def test_scrub_withholds_what_is_quoted() -> None:
    assert phi.scrub("Invalid value for VR DA: '01/02/1970'.") == "Invalid value for VR DA: <withheld>."
    assert phi.scrub("Invalid value for VR PN: 'O'Brien^Ann'.") == "Invalid value for VR PN: <withheld>."
    assert phi.scrub('The string "DOE" is unlikely') == "The string <withheld> is unlikely"
    assert phi.scrub("a lone 'quote to the end") == "a lone <withheld>"
    assert phi.scrub("no quotes: kept") == "no quotes: kept"


@pytest.fixture
def captured() -> io.StringIO:
    phi.install()
    # pytest restores `warnings.showwarning` after each test, undoing the routing of warnings into
    # logging that an earlier test's phi.install() made (a pneumo process routes them once, at
    # start); route them again for this test.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_library_records_warnings_and_tracebacks_are_scrubbed(captured: io.StringIO) -> None:
    logging.getLogger("pydicom").warning("Invalid value for VR DA: %r.", "Zyxdate")
    message = 'The string "ZYXNAME" is unlikely to represent the intended person name'
    with warnings.catch_warnings():  # as highdicom's check_person_name warns
        warnings.simplefilter("always")
        warnings.warn(message, UserWarning, stacklevel=1)
    value = "Zyx 01/02/1970"  # a traceback shows code lines: here the name, never the value
    try:
        DA(value)
    except ValueError:
        logging.getLogger("celery.app.trace").exception("Task raised: %s", "ValueError('Zyx')")
        logging.getLogger("worker.tasks").exception("delivery 7 failed")
    logging.getLogger("worker.classify").info("instance 1.2.3 classified: 'kept as written'")
    text = captured.getvalue().replace('value = "Zyx 01/02/1970"', "")
    assert "zyx" not in text.lower()
    assert "Invalid value for VR DA: <withheld>." in text and "is unlikely to represent" in text
    assert "ValueError: Unable to convert <withheld> object" in text  # the traceback's last line
    assert 'File "' in text  # file names in tracebacks are kept
    assert "instance 1.2.3 classified: 'kept as written'" in text
