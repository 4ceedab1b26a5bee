"""The SR is always built (issue 23, rows 3 and 4): every attribute highdicom copies into it, in
every invalid form a modality writes, gives a valid SR with the value left out or repaired and
the change named (never the value).

Each SR is read by dcmtk's `dsrdump` (no warning) and dicom3tools' `dciodvfy` (no error, and no
warning but the two the clean SR has too). The header is written with raw bytes, as a modality
would, so pydicom's own checks do not tidy it up before the worker reads it.
"""

from __future__ import annotations

import io
import random
import subprocess
from pathlib import Path

import pytest
from highdicom._standard_utils import get_module_attribute_map
from pydicom import dcmread
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from tests.helpers import requires_program
from worker.report import ImageFinding, build_sr
from worker.sr_header import ENUMERATED_VALUES, copied_keywords, drop_invalid_values

pytestmark = [requires_program("dsrdump", "dcmtk"), requires_program("dciodvfy", "dicom3tools")]

# dciodvfy warnings that are no fault: a defined term it does not know (our local coding scheme
# 99PNEUMO, and defined terms may be extended, PS3.3 5.3) and, when an invalid Patient ID was
# left empty (type 2: allowed), advice for building a DICOMDIR.
ACCEPTED_WARNINGS = ("Unrecognized defined term <",
                     "Missing attribute or value that would be needed to build DICOMDIR")
# Attributes newer than dicom3tools 2022 (issuers of clinical trial IDs; Requesting Service in
# the General Study module; Device UID in Contributing Equipment, for IHE AIR): standard today,
# unknown to it, so it calls the SR extended.
NEWER_THAN_DCIODVFY = ("(0x0012,0x0022)", "(0x0012,0x0032)", "(0x0012,0x0041)", "(0x0018,0x1002)",
                       "(0x0012,0x0043)", "(0x0032,0x1033)", "this is a Standard Extended SOP Class")
# The node refuses an image whose UIDs are invalid, so these are valid by the time of the SR.
REFERENCES = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
DX = DigitalXRayImageStorageForPresentation
COPIED = sorted(copied_keywords(DX) - REFERENCES)
NAME = "Qzx^Zara"  # a patient value: must never be in what drop_invalid_values returns

# A valid value per VR, and the longest value the VR allows (PS3.5 table 6.2-1).
VALID = {
    "AE": b"AE1", "AS": b"045Y", "CS": b"ABC", "DA": b"19700102", "DS": b"1.5",
    "DT": b"19700102120000", "IS": b"2", "LO": b"Abc", "LT": b"Abc", "PN": b"Doe^Jane",
    "SH": b"Abc", "ST": b"Abc", "TM": b"120000", "UC": b"Abc", "UI": b"1.2.3", "UR": b"http://a",
    "UT": b"Abc", "US": b"\x01\x00", "FD": b"\x00" * 8,
}
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
              "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
            "UI", "UR", "UT"}
BAD_FORMAT = {"DA": b"01/02/1970", "TM": b"25:61:00", "DT": b"yesterday", "DS": b"heavy",
              "IS": b"1.5", "AS": b"45", "UI": b"1.2.abc", "CS": b"lower case",
              "PN": b"A^B^C^D^E^F^G", "US": b"\x01\x00\x00", "FD": b"\x00\x00\x00"}


def _over_long(vr: str) -> bytes | None:
    if vr not in MAX_LENGTH:
        return None
    return (b"1" if vr in {"DA", "DS", "DT", "IS", "TM", "UI", "AS"} else b"A") * (MAX_LENGTH[vr] + 1)


def _wrong_vm(vr: str, vm: str) -> bytes | None:
    """Two values where the standard allows one (a backslash in an Accession Number)."""
    if vm != "1" or vr not in TEXT_VRS - {"LT", "ST", "UT", "UR"}:  # a backslash is text there
        return None
    return VALID[vr] + b"\\" + VALID[vr]


def _wrong_vr(vr: str) -> tuple[str, bytes] | None:
    """A valid value under a VR the standard does not give the attribute."""
    if vr in TEXT_VRS:
        return ("LO" if vr == "UT" else "UT", VALID[vr])
    if vr in {"US", "FD"}:
        return ("IS" if vr == "US" else "DS", b"2")
    return None


ANIMAL = {"PatientSpeciesDescription", "PatientBreedDescription", "StrainDescription",
          "StrainNomenclature", "StrainAdditionalInformation"}


# Each form: keyword -> (VR written, bytes) for every copied attribute it applies to.
def _form(make) -> dict[str, tuple[str, bytes]]:
    forms = {}
    for keyword in COPIED:
        vr, vm = dictionary_VR(keyword), dictionary_VM(keyword)
        if vr == "SQ":
            continue
        made = make(keyword, vr, vm)
        if made is not None:
            forms[keyword] = made if isinstance(made, tuple) else (vr, made)
    return forms


FORMS = {
    "over-long": _form(lambda _k, vr, _vm: _over_long(vr)),
    "control character": _form(lambda _k, vr, _vm: b"A\x07B" if vr in TEXT_VRS else None),
    "escape character": _form(lambda _k, vr, _vm: b"A\x1b$BC" if vr in TEXT_VRS else None),
    "wrong VM (backslash)": _form(lambda _k, vr, vm: _wrong_vm(vr, vm)),
    "wrong format": _form(lambda _k, vr, _vm: BAD_FORMAT.get(vr)),
    # A valid value each: not for those that make the patient an animal (then others are
    # required): a human patient with a breed is inconsistent before anything is broken.
    "wrong VR (valid value)": _form(lambda k, vr, _vm: _wrong_vr(vr) if k not in ANIMAL else None),
    # A character set pydicom cannot read as text makes the file unreadable: the node refuses it.
    "wrong VR (binary)": _form(lambda k, vr, _vm: ("OB", VALID[vr])
                               if vr in TEXT_VRS and k != "SpecificCharacterSet" else None),
    "wrong enumerated value": _form(
        lambda k, vr, _vm: (b"\x05\x00" if vr == "US" else b"U") if k in ENUMERATED_VALUES else None),
}

# The instances issue 23 names, each alone, with what the SR must then hold.
NAMED = {
    "PatientSex U": ("PatientSex", "CS", b"U", "PatientSex", ""),
    "PatientSex X": ("PatientSex", "CS", b"X", "PatientSex", ""),
    "PatientSex lower case": ("PatientSex", "CS", b"m", "PatientSex repaired", "M"),
    "PatientSex MALE": ("PatientSex", "CS", b"MALE", "PatientSex", ""),
    "character set ISO_IR 999": ("SpecificCharacterSet", "CS", b"ISO_IR 999",
                                 "SpecificCharacterSet repaired", "ISO_IR 100"),
    "character set ISO_IR_100": ("SpecificCharacterSet", "CS", b"ISO_IR_100",
                                 "SpecificCharacterSet repaired", "ISO_IR 100"),
    "character set ISO IR 100": ("SpecificCharacterSet", "CS", b"ISO IR 100",
                                 "SpecificCharacterSet repaired", "ISO_IR 100"),
    "character set lower case": ("SpecificCharacterSet", "CS", b"iso_ir 100",
                                 "SpecificCharacterSet repaired", "ISO_IR 100"),
    "character set empty, Latin-1 text": ("SpecificCharacterSet", "CS", b"",
                                          "SpecificCharacterSet repaired", "ISO_IR 100"),
    "7-part name": ("PatientName", "PN", b"A^B^C^D^E^F^G", "PatientName", ""),
    "4 name groups": ("PatientName", "PN", b"A=B=C=D", "PatientName", ""),
    "backslash in Accession Number": ("AccessionNumber", "SH", b"A1\\A2", "AccessionNumber", ""),
    "over-long Patient ID": ("PatientID", "LO", b"P" * 65, "PatientID", ""),
    "bell in Patient ID": ("PatientID", "LO", b"P\x07Q", "PatientID", ""),
    "name sent as LO": ("PatientName", "LO", b"Doe^Jane", "PatientName repaired", "Doe^Jane"),
    "birth date sent as LO": ("PatientBirthDate", "LO", b"19700102",
                              "PatientBirthDate repaired", "19700102"),
    "age without unit": ("PatientAge", "AS", b"45", "PatientAge", None),
    "weight as a word": ("PatientWeight", "DS", b"heavy", "PatientWeight", None),
    "referring physician, 6 components": (
        "ReferringPhysicianName", "PN", b"A^B^C^D^E^F", "ReferringPhysicianName", ""),
}


def source_header(latin1_name: bool = False) -> Dataset:
    """A DX header as the node stores it (no pixel data: the SR never reads it)."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = DX
    dataset.SOPInstanceUID, dataset.StudyInstanceUID = generate_uid(), generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.PatientName = "Qzx^Zaïra" if latin1_name else NAME
    dataset.PatientID, dataset.PatientBirthDate, dataset.PatientSex = "QZX-1", "19700102", "F"
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = "20240101", "120000", "1"
    dataset.AccessionNumber, dataset.ReferringPhysicianName = "ACC1", ""
    dataset.Modality, dataset.Manufacturer, dataset.InstitutionName = "DX", "Acme", "General"
    return reread(dataset)


def reread(dataset: Dataset) -> Dataset:
    """The dataset as read from a file: raw elements put in then are written as they are."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def put_raw(dataset: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """The element as a modality wrote it: these bytes under this VR, unchecked."""
    if len(value) % 2:
        value += b"\x00" if vr in {"UI", "OB"} else b" "
    tag = tag_for_keyword(keyword)
    dataset[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def save_as_is(dataset: Dataset, path: Path) -> None:
    """Saved with every raw element's bytes as they are (pydicom's writer converts them all,
    and fails on some, once the character set differs from the one read)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, dataset.file_meta, enforce_standard=True)
    for tag in sorted(dataset.keys()):
        write_data_element(fp, dataset.get_item(tag), ["iso8859"])
    path.write_bytes(fp.getvalue())


def build_and_check(dataset: Dataset, folder: Path) -> tuple[list[str], Dataset]:
    """Stored, read back as the worker reads it, made fit, built, saved and validated."""
    stored = folder / "image.dcm"
    save_as_is(dataset, stored)
    header = dcmread(stored, stop_before_pixels=True, defer_size=1 << 20)
    changes = drop_invalid_values(header)
    report = build_sr([ImageFinding(header, 0.25, False)], "pneumo-test", "1.0.0", 0.5)
    path = folder / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    assert_valid(path)
    return changes, dcmread(path)


def assert_valid(path: Path) -> None:
    """dsrdump without a warning; dciodvfy without an error or an unexpected warning."""
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, errors="replace")
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    verify = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
    findings = [line for line in verify.stderr.splitlines()
                if line.startswith(("Error", "Warning"))
                and not any(w in line for w in (*ACCEPTED_WARNINGS, *NEWER_THAN_DCIODVFY))]
    assert not findings, findings


def test_the_clean_header_is_copied_unchanged(tmp_path: Path) -> None:
    """The baseline the forms are judged against: nothing changed, nothing audited."""
    changes, report = build_and_check(source_header(latin1_name=True), tmp_path)
    assert changes == []
    assert (report.PatientName, report.PatientSex, report.SpecificCharacterSet) == (
        "Qzx^Zaïra", "F", "ISO_IR 100")


@pytest.mark.parametrize("case", list(NAMED))
def test_named_invalid_values(case: str, tmp_path: Path) -> None:
    """PatientSex U or X and the bad character sets stopped the SR ("not a valid
    PatientSexValues / SpecificCharacterSetValues"); a 7-part name and a backslash in Accession
    Number were copied and dsrdump warned. Now each is left out (type 2: kept empty) or repaired,
    and named in what is audited."""
    keyword, vr, value, change, expected = NAMED[case]
    dataset = source_header(latin1_name=keyword == "SpecificCharacterSet")
    put_raw(dataset, keyword, vr, value)
    changes, report = build_and_check(dataset, tmp_path)
    assert changes == ([change] if change else [])
    if expected is None:
        assert keyword not in report
    else:
        assert str(report[keyword].value or "") == expected
        assert dictionary_VR(keyword) == report[keyword].VR
    if keyword == "SpecificCharacterSet":
        assert report.PatientName == "Qzx^Zaïra"  # decoded as Latin-1, written as Latin-1


@pytest.mark.parametrize("form", list(FORMS))
def test_every_copied_attribute_in_every_invalid_form(form: str, tmp_path: Path) -> None:
    """One header with every attribute the form applies to written that way at once; each is
    named in the changes (left out or repaired), the SR is built and valid. The values never
    appear in what is returned for the audit."""
    broken = FORMS[form]
    assert broken, f"{form} applies to no copied attribute"
    dataset = source_header()
    for keyword, (vr, value) in broken.items():
        put_raw(dataset, keyword, vr, value)
    changes, report = build_and_check(dataset, tmp_path)
    named = {change.removesuffix(" repaired") for change in changes}
    assert set(broken) <= named, sorted(set(broken) - named)
    assert not [change for change in changes if "Qzx" in change or "\x07" in change]
    for keyword in broken:
        if keyword in report and not report[keyword].is_empty:
            assert dictionary_VR(keyword) == report[keyword].VR, keyword


def test_the_copied_attributes_are_those_highdicom_copies() -> None:
    """The list the worker checks is highdicom's own (its Patient and Study modules for DX), so
    a highdicom that copies more is checked too; the issue's attributes are among them."""
    patient = {a["keyword"] for a in get_module_attribute_map()["patient"] if not a["path"]}
    assert patient <= copied_keywords(DX)
    assert {"PatientName", "PatientID", "PatientSex", "PatientBirthDate", "PatientAge",
            "AccessionNumber", "ReferringPhysicianName", "StudyID", "SpecificCharacterSet",
            "Manufacturer", "InstitutionName"} <= copied_keywords(DX)
    assert len(copied_keywords(DX)) > 100


def test_nested_item_values_are_checked(tmp_path: Path) -> None:
    """A copied sequence's items are checked too: an over-long ID in Other Patient IDs leaves
    the sequence out (its item would lack a type 1 value)."""
    dataset = source_header()
    item = Dataset()
    item.PatientID, item.TypeOfPatientID = "QZX-2", "TEXT"
    dataset.OtherPatientIDsSequence = [item]
    dataset = reread(dataset)
    put_raw(dataset.OtherPatientIDsSequence[0], "PatientID", "LO", b"Q" * 70)
    changes, report = build_and_check(dataset, tmp_path)
    assert changes == ["OtherPatientIDsSequence"]  # its item would lack a required value
    assert "OtherPatientIDsSequence" not in report


def test_tracking_identifier_holds_the_whole_uid(tmp_path: Path) -> None:
    """Issue 22: the Tracking Identifier was cut at 64 characters, mid-UID. It is a TEXT item:
    the whole UID is kept, and so is a long not-assessed reason."""
    dataset = source_header()
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "12345678"
    assert len(dataset.SOPInstanceUID) == 64
    reason = "outside the version's validated scope: " + "x" * 1200
    stored = tmp_path / "image.dcm"
    dataset.save_as(stored, enforce_file_format=True)
    header = dcmread(stored)
    report = build_sr([ImageFinding(header, None, None, reason)], "pneumo-test", "1.0.0", 0.5)
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert_valid(tmp_path / "sr.dcm")
    texts = [item.TextValue for item in _content_items(report) if "TextValue" in item]
    assert f"pneumonia classification of {dataset.SOPInstanceUID}" in texts
    assert f"not assessed: {reason}" in texts
    assert report.SeriesDescription == "AI pneumonia pneumo-test 1.0.0"


def _content_items(dataset: Dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


MUTATION_CASES = 120
_ALPHABET = b"AZaz09^=\\ .-:/*\x00\x07\x0a\x1b\x7f\xe9\xfc\xc3\xa9"


def _mutation(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """1 to 3 copied attributes, each given random bytes under its own VR or another one."""
    mutated = []
    for keyword in rng.sample(COPIED, rng.randint(1, 3)):
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            continue
        if rng.random() < 0.2:
            vr = rng.choice(["LO", "UT", "CS", "DA", "PN", "US", "OB"])
        length = rng.choice([0, 1, 2, 4, 8, 16, 17, 64, 65, 70])
        mutated.append((keyword, vr, bytes(rng.choice(_ALPHABET) for _ in range(length))))
    return mutated


def test_random_mutations_of_the_copied_attributes(tmp_path: Path) -> None:
    """120 headers with 1 to 3 copied attributes given random bytes (a fixed seed: the same
    cases every run): every SR is built, and dsrdump reads them all without a warning."""
    rng = random.Random(23)
    paths = []
    for case in range(MUTATION_CASES):
        dataset = source_header(latin1_name=True)
        mutation = _mutation(rng)
        for keyword, vr, value in mutation:
            put_raw(dataset, keyword, vr, value)
        folder = tmp_path / str(case)
        folder.mkdir()
        save_as_is(dataset, folder / "image.dcm")
        try:
            header = dcmread(folder / "image.dcm", stop_before_pixels=True, defer_size=1 << 20)
        except Exception:
            # pydicom cannot read a file whose character set is not text (a NUL, bytes): the
            # node reads with dcmread too, and refuses it as unreadable before any SR.
            assert "SpecificCharacterSet" in {keyword for keyword, _, _ in mutation}
            continue
        drop_invalid_values(header)
        report = build_sr([ImageFinding(header, 0.75, True)], "pneumo-test", "1.0.0", 0.5)
        report.save_as(folder / "sr.dcm", enforce_file_format=True)
        paths.append(str(folder / "sr.dcm"))
    assert len(paths) > MUTATION_CASES * 0.95
    dump = subprocess.run(["dsrdump", *paths], capture_output=True, text=True, errors="replace")
    assert dump.returncode == 0 and not dump.stderr, dump.stderr[:2000]


TRIAL_SUBJECT = {"ClinicalTrialSponsorName": "Acme", "ClinicalTrialProtocolID": "P-1",
                 "ClinicalTrialProtocolName": "Lungs", "ClinicalTrialSiteID": "S-1",
                 "ClinicalTrialSiteName": "General", "ClinicalTrialSubjectID": "QZX-S1"}


def test_a_module_left_without_a_required_value_goes_whole(tmp_path: Path) -> None:
    """An over-long sponsor name (type 1 in Clinical Trial Subject) leaves the whole optional
    module out: copied without it, the SR would be invalid (dciodvfy: missing type 1)."""
    dataset = source_header()
    for keyword, value in TRIAL_SUBJECT.items():
        setattr(dataset, keyword, value)
    dataset = reread(dataset)
    put_raw(dataset, "ClinicalTrialSponsorName", "LO", b"S" * 65)
    changes, report = build_and_check(dataset, tmp_path)
    assert sorted(changes) == sorted(TRIAL_SUBJECT)
    assert not [keyword for keyword in TRIAL_SUBJECT if keyword in report]


def test_a_responsible_person_without_a_valid_role_is_left_out(tmp_path: Path) -> None:
    """Responsible Person Role is required with a Responsible Person (1C): a role that is not
    a valid CS takes the person out with it."""
    dataset = source_header()
    dataset.ResponsiblePerson = "Qzx^Parent"
    dataset = reread(dataset)
    put_raw(dataset, "ResponsiblePersonRole", "CS", b"mother")
    changes, report = build_and_check(dataset, tmp_path)
    assert changes == ["ResponsiblePersonRole", "ResponsiblePerson"]
    assert "ResponsiblePerson" not in report
