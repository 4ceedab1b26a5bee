"""The image header made fit to be copied into the SR: what highdicom copies, checked and fixed.

highdicom copies the first image's Patient and Study modules, its Specific Character Set and its
acquisition equipment into the SR. A modality's wrong value there either stopped the SR or made
it invalid DICOM; `drop_invalid_values` repairs or leaves out each such value and says which,
never what it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

from highdicom._standard_utils import (  # the standard's tables, as highdicom copies by them
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from highdicom.enum import SpecificCharacterSetValues
from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import validate_value

# Type 2 attributes highdicom copies from the evidence; some modalities leave them out.
PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def drop_invalid_values(dataset: Dataset) -> list[str]:
    """Make the header fit to be copied into the SR, in place; what was left out or repaired.

    Why: highdicom copies the Patient and Study modules, the Specific Character Set and the
    acquisition equipment of the first image into the SR, and converts or checks some of them.
    A value a modality wrote wrongly either stopped the SR ("'U' is not a valid PatientSexValues",
    "'ISO_IR 999' is not a valid SpecificCharacterSetValues", "Unable to convert ... to 'DA'"), so
    the result never reached the PACS, or was copied as it was and made the SR invalid DICOM (a
    7-part name, a backslash in Accession Number). Each attribute highdicom copies
    (`copied_keywords`), nested items included, is checked for its VR (format, length,
    characters), its VM and, where the standard enumerates them, its values. A value that can be
    repaired without guessing (a lower-case enumerated value, a valid value under the wrong VR)
    is repaired; anything else is removed, a type 2 patient/study attribute kept empty; a module
    left without an attribute it requires goes whole. An unknown or misspelled character set is
    replaced by one that holds the text as pydicom decoded it (its correction of a misspelling,
    else Latin-1): none for ASCII, else ISO_IR 100, else UTF-8.

    Returns one entry per change, the keyword for a value left out and "<keyword> repaired" for
    one repaired: never the value itself (patient data stays out of audits and logs).
    """
    sop_class = str(dataset.get("SOPClassUID", ""))
    copied = copied_keywords(sop_class)
    charset = _declared_character_set(dataset)  # first: every text value decodes with it
    changes = _check_elements(dataset, copied)
    changes += _settle_modules(dataset, sop_class, {c for c in changes if " " not in c})
    changes += _settle_character_set(dataset, charset, copied)
    return changes


# What `ContributingEquipment.for_image_acquisition` reads from the first image.
_ACQUISITION_EQUIPMENT = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress", "StationName",
    "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
)


def _declared_character_set(dataset: Dataset) -> list[str]:
    """The Specific Character Set as declared, made a CS element if it was not one; an empty
    one (the default repertoire) removed, as highdicom refuses to copy it.

    Why: pydicom decodes every text value with it, and one written under another VR (bytes)
    made each decoding raise, so every text value would have been left out.
    """
    if "SpecificCharacterSet" not in dataset:
        return []
    try:
        value = dataset["SpecificCharacterSet"].value
    except Exception:
        value = dataset.get_item("SpecificCharacterSet").value
    if isinstance(value, bytes):
        value = value.decode("latin-1").strip(" \x00").split("\\")
    values = [value] if isinstance(value, str) else list(value) if value is not None else []
    if not all(isinstance(v, str) for v in values):
        values = ["?"]  # not text at all: invalid, and audited as such
    if not [v for v in values if v]:
        del dataset.SpecificCharacterSet
        return []
    dataset.SpecificCharacterSet = values if len(values) > 1 else values[0]
    return values


@lru_cache
def _iod_modules(sop_class_uid: str) -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
    """(key, usage, ((keyword, type), ...)) of each Patient and Study module of the IOD, root
    level."""
    iods, modules, attributes = get_sop_class_iod_map(), get_iod_module_map(), get_module_attribute_map()
    return tuple(
        (module["key"], module["usage"], tuple((str(a["keyword"]), str(a["type"]))
                                for a in attributes[module["key"]] if not a["path"]))
        for module in modules.get(iods.get(sop_class_uid, ""), [])
        if module["ie"] in ("Patient", "Study")
    )


# In the mandatory Patient module: an attribute required (1C) when others have a value; without
# it, those are left out (PS3.3 C.7.1.1).
_REQUIRED_WITH = {
    "PatientAlternativeCalendar": ("PatientBirthDateInAlternativeCalendar",
                                   "PatientDeathDateInAlternativeCalendar"),
    "ResponsiblePersonRole": ("ResponsiblePerson",),
}


def _settle_modules(dataset: Dataset, sop_class_uid: str, left_out: set[str]) -> list[str]:
    """Modules left whole: an optional module (clinical trial, patient study) without a type 1
    attribute, or whose 1C attribute was left out, is left out entirely; in the Patient module,
    what a left-out 1C attribute was required by goes too. The keywords left out."""
    changes = []
    for module, usage, attributes in _iod_modules(sop_class_uid):
        present = [keyword for keyword, _ in attributes if keyword in dataset]
        if not present or (usage == "M" and module != "patient"):
            continue
        if module == "patient":
            for key, dependents in _REQUIRED_WITH.items():
                if key in left_out or _empty(dataset, key):  # required (1C) by these, and missing
                    for keyword in dependents:
                        if not _empty(dataset, keyword):
                            changes.append(_leave_out(dataset, tag_for_keyword(keyword), keyword))
            if _empty(dataset, "ResponsiblePerson") and not _empty(dataset, "ResponsiblePersonRole"):
                # Present only with a Responsible Person.
                changes.append(_leave_out(dataset, tag_for_keyword("ResponsiblePersonRole"),
                                          "ResponsiblePersonRole"))
            if (dataset.get("PatientIdentityRemoved") == "YES" and _empty(dataset, "DeidentificationMethod")
                    and _empty(dataset, "DeidentificationMethodCodeSequence")):
                # 'YES' requires a method; without one, the claim is left out.
                changes.append(_leave_out(dataset, tag_for_keyword("PatientIdentityRemoved"),
                                          "PatientIdentityRemoved"))
            continue
        incomplete = any(
            (kind == "1" and (keyword not in dataset or dataset[keyword].is_empty))
            or (kind == "1C" and keyword in left_out) for keyword, kind in attributes)
        if incomplete:
            changes += [_leave_out(dataset, tag_for_keyword(k), k) for k in present]
    return changes


def _empty(dataset: Dataset, keyword: str) -> bool:
    return keyword not in dataset or dataset[keyword].is_empty


@lru_cache
def copied_keywords(sop_class_uid: str) -> frozenset[str]:
    """The attributes highdicom copies from an image of this SOP class into the SR.

    The root attributes of the Patient and Study modules of its IOD (`SOPClass.
    copy_patient_and_study_information`, 103 for CR, DX and secondary capture), the acquisition
    equipment and the character set. Only these are checked: the rest of the header never
    reaches the SR, and an audit naming it would mislead.
    """
    iods, modules, attributes = get_sop_class_iod_map(), get_iod_module_map(), get_module_attribute_map()
    keywords = {"SpecificCharacterSet", *PATIENT_STUDY_TYPE2, *_ACQUISITION_EQUIPMENT}
    for module in modules.get(iods.get(sop_class_uid, ""), []):
        if module["ie"] in ("Patient", "Study"):
            keywords.update(str(a["keyword"]) for a in attributes[module["key"]] if not a["path"])
    return frozenset(keywords)


# Enumerated values (PS3.3) of the attributes highdicom copies into the SR; a lower-case or
# padded value is repaired, any other value left out. 'U' (unknown) or 'X' in Patient's Sex
# are not DICOM: unknown is an empty value.
ENUMERATED_VALUES: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "TypeOfPatientID": frozenset({"TEXT", "RFID", "BARCODE"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "PregnancyStatus": frozenset({"1", "2", "3", "4"}),
    "LongitudinalTemporalEventType": frozenset({"ENROLLMENT", "BASELINE"}),
}
# Elements the SR references the images by: kept whatever they hold (the node stored the image
# under them, and the SR cannot name the image otherwise).
_REFERENCES = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
# Text VRs (PS3.5 6.2): the short ones allow no control character; the long ones LF, FF, CR, TAB.
_SHORT_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI", "UR"}
_LONG_TEXT_VRS = {"LT", "ST", "UT"}
_TEXT_VRS = _SHORT_TEXT_VRS | _LONG_TEXT_VRS
_LONG_TEXT_CONTROLS = set("\t\n\f\r")
_PN_GROUPS, _PN_COMPONENTS = 3, 5


def _check_elements(dataset: Dataset, only: frozenset[str] | None = None) -> list[str]:
    """`drop_invalid_values` for the elements of one level named in `only` (all when None), and
    every element of their sequence items."""
    changes = []
    for tag in list(dataset.keys()):
        if tag == 0x00080005 or (only is not None and keyword_for_tag(tag) not in only):
            continue  # the character set is settled last; what is not copied stays as it is
        try:
            changes += _check_element(dataset, tag, root=only is not None)
        except Exception:  # a raw value that does not convert, or anything a check trips on
            changes.append(_leave_out(dataset, tag, keyword_for_tag(tag) or str(tag)))
    return changes


def _check_element(dataset: Dataset, tag: BaseTag, root: bool) -> list[str]:
    """One element made valid in place: [] when it was, else what was done to it."""
    element = dataset[tag]  # a raw value is converted here, and may not convert at all
    keyword = element.keyword or str(element.tag)
    if keyword in _REFERENCES:
        return []
    if element.VR == "SQ":
        nested = [change for item in element.value or [] for change in _check_elements(item)]
        if nested and root:
            # An item without a value it requires is invalid: the whole sequence goes.
            return [_leave_out(dataset, tag, keyword)]
        return nested
    expected_vr = None if tag.is_private else dictionary_vr(tag)
    if element.VR in _BINARY_VRS and (expected_vr is None or expected_vr in _BINARY_VRS):
        return []
    repaired = False
    if expected_vr and expected_vr != element.VR:
        element = _retyped(element, expected_vr)
        if element is None:
            return [_leave_out(dataset, tag, keyword)]
        dataset[tag], repaired = element, True
    enumerated = ENUMERATED_VALUES.get(keyword)
    if enumerated and not element.is_empty and str(element.value) not in enumerated:
        fixed = str(element.value).strip().upper()
        if element.VM != 1 or fixed not in enumerated:
            return [_leave_out(dataset, tag, keyword)]
        element.value, repaired = type(element.value)(fixed), True
    if not _valid(element):
        return [_leave_out(dataset, tag, keyword)]
    return [f"{keyword} repaired"] if repaired else []


def dictionary_vr(tag: BaseTag) -> str | None:
    """The one VR the standard gives a public element; None when unknown or ambiguous."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if " " not in vr else None  # 'US or SS', 'OB or OW': chosen by context


def _retyped(element: DataElement, vr: str) -> DataElement | None:
    """The element with the VR the standard gives it, when its value reads as text in both."""
    if element.VR not in _TEXT_VRS or vr not in _TEXT_VRS | {"US", "SS", "UL", "SL", "FL", "FD"}:
        return None
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    texts = ["" if value is None else str(value) for value in values]
    try:
        if vr in _TEXT_VRS:
            return DataElement(element.tag, vr, texts if len(texts) > 1 else texts[0])
        number = int if vr in {"US", "SS", "UL", "SL"} else float
        return DataElement(element.tag, vr, [number(t) for t in texts] if len(texts) > 1
                           else number(texts[0]) if texts[0] else None)
    except (TypeError, ValueError, OverflowError):
        return None


def _valid(element: DataElement) -> bool:
    """The value fits its VR (format, length, characters) and its VM."""
    if element.is_empty:
        return True
    if not _vm_allows(element.VM, dictionary_VM(element.tag) if dictionary_vr(element.tag) else "1-n"):
        return False
    values = element.value if isinstance(element.value, MultiValue | list | tuple) else [element.value]
    try:
        for value in values:
            if element.VR in {"US", "SS", "UL", "SL"} and isinstance(value, int):
                validate_value(element.VR, value, config.RAISE)
                continue
            text = "" if value is None else str(value)
            if element.VR in _TEXT_VRS and not _characters_allowed(element.VR, text):
                return False
            if element.VR == "PN" and not _person_name_valid(text):
                return False
            if text and element.VR in _TEXT_VRS:
                # What pydicom could not convert stays text (a date, a number); names are
                # checked as text too (component lengths).
                validate_value(element.VR, text, config.RAISE)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _vm_allows(count: int, vm: str) -> bool:
    """Whether `count` values fit a dictionary VM: '1', '1-3', '1-n', '2-2n'."""
    low, _, high = vm.partition("-")
    if not high:
        return count == int(low)
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= int(low) and count % step == 0
    return int(low) <= count <= int(high)


def _characters_allowed(vr: str, text: str) -> bool:
    """No control character (a bell, an escape left over, NUL) but those long text allows."""
    allowed = _LONG_TEXT_CONTROLS if vr in _LONG_TEXT_VRS else set()
    return not any((ord(c) < 0x20 or ord(c) == 0x7F) and c not in allowed for c in text)


def _person_name_valid(text: str) -> bool:
    """At most three component groups of at most five components (PS3.5 6.2.1)."""
    groups = text.split("=")
    return len(groups) <= _PN_GROUPS and all(g.count("^") < _PN_COMPONENTS for g in groups)


def _leave_out(dataset: Dataset, tag: BaseTag, keyword: str) -> str:
    """Remove the element, or empty it if highdicom needs it present (type 2); its keyword."""
    if keyword in PATIENT_STUDY_TYPE2:
        dataset[tag] = DataElement(tag, dictionary_VR(tag), None)
    else:
        del dataset[tag]
    return keyword


# Character sets kept as they are: the single-byte ones and UTF-8, known to both pydicom (which
# decodes and encodes the text) and highdicom (which checks the SR's).
_HIGHDICOM_CHARSETS = frozenset(e.value for e in SpecificCharacterSetValues)
_KEPT_CHARSETS = frozenset(v for v in python_encoding if v in _HIGHDICOM_CHARSETS
                           and not v.startswith("ISO 2022"))
LATIN1, UTF8 = "ISO_IR 100", "ISO_IR 192"


def _settle_character_set(dataset: Dataset, declared: list[str], copied: frozenset[str]) -> list[str]:
    """One character set every text value of the header can be written in (all decoded by now).

    A valid one that holds the text is kept. Otherwise the first that does of: none (ASCII),
    ISO_IR 100 (Latin-1, what pydicom decodes an unknown one as, and the only one besides ASCII
    that dcmtk's VR checker reads without a warning), UTF-8. An invalid one ('ISO_IR 999',
    'ISO_IR_100') or a missing one for non-ASCII text is audited; a valid one that pydicom or
    highdicom cannot write (code extensions, 'ISO_IR 203') is not, as no value changes.
    """
    valid = all(v in python_encoding or v in _HIGHDICOM_CHARSETS for v in declared)
    texts = list(_texts(dataset, copied))
    if len(declared) == 1 and declared[0] in _KEPT_CHARSETS and _encodable(texts, declared[0]):
        return []
    chosen = next(c for c in (None, LATIN1, UTF8) if _encodable(texts, c))
    if chosen is None:
        if "SpecificCharacterSet" in dataset:
            del dataset.SpecificCharacterSet
    else:
        dataset.SpecificCharacterSet = chosen
    if (valid and declared) or (not declared and chosen is None):
        return []
    return ["SpecificCharacterSet repaired" if chosen else "SpecificCharacterSet"]


def _texts(dataset: Dataset, only: frozenset[str] | None = None) -> Iterator[str]:
    """Every text value the SR copies (`only` at this level), nested items included."""
    for tag in list(dataset.keys()):
        if only is not None and keyword_for_tag(tag) not in only:
            continue
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _texts(item)
        elif element.VR in _TEXT_VRS and not element.is_empty:
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            yield from (str(value) for value in values)


def _encodable(texts: list[str], charset: str | None) -> bool:
    """Whether every text can be written in `charset` (None: the default repertoire, ASCII)."""
    codec = python_encoding[charset] if charset else "ascii"
    try:
        for text in texts:
            text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True
