"""The DICOM SR for one study and model version, built with highdicom (TID 1500).

One image-level group (TID 1501) per image the version looked at: Pneumonia (SCT 233604007)
Present/Absent with the probability as a measurement for a classified image; Undetermined with a
"not assessed" comment and its reason for one outside the version's validated scope (never Absent
for what was not assessed); the algorithm (TID 4019) in both; the image's picture (worker.picture)
as an IMAGE item where one was made. What the result is for (intended use, limitations, how the
probability relates to the threshold) is a TEXT item at the root, and the version is named as IHE
AI Results (AIR) asks: a Contributing Equipment item "Processing Algorithm" with a device UID that
changes with the weights. UIDs derive from (study, model, version), so a re-built SR replaces the
earlier one at the PACS instead of adding another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from worker.sr_header import PATIENT_STUDY_TYPE2, drop_invalid_values

MANUFACTURER = "Pneumo"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
# CID 240 (Present/Absent/Undetermined) as pydicom carries it: Absent is SCT 272519000 today.
PRESENT, ABSENT, UNDETERMINED = codes.SCT.Present, codes.SCT.Absent, codes.SCT.Undetermined
CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = Code("PNEUMO-P", "99PNEUMO", "Pneumonia probability")
NO_UNITS = Code("1", "UCUM", "no units")
INTENDED_USE = Code("PNEUMO-USE", "99PNEUMO", "Intended use and limitations")
# IHE AIR Rev 1.1 section 6.5.3.1: the purpose of the algorithm's Contributing Equipment item. Not
# (yet) in CID 7005 (its DCM 109103 is "Modifying Equipment"), so the code IHE assigned is used.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
SR_SERIES_NUMBER = 990


@dataclass(frozen=True)
class ImageFinding:
    """One image's result: classified (probability, present) or not assessed (the reason)."""

    source: Dataset  # the image's header (pixel data not needed)
    probability: float | None
    present: bool | None
    not_assessed: str | None = None  # why the version gave no finding (out of its scope)


def sr_uids(study_instance_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(series, SOP instance) UIDs, the same for every build of this study's report."""
    sources = [study_instance_uid, model_name, model_version]
    return (
        generate_uid(entropy_srcs=[*sources, "series"]),
        generate_uid(entropy_srcs=[*sources, "instance"]),
    )


def device_uid(model_name: str, model_version: str, model_sha256: str | None) -> str:
    """The version's Device UID (AIR): from name, version and the weights' SHA-256, so a
    retrained model (new weights) is another device even under a reused version string."""
    return generate_uid(entropy_srcs=[model_name, model_version, model_sha256 or "unknown weights"])


def intended_use_text(threshold: float, card: Mapping[str, Any] | None) -> str:
    """What the result is for and what it is not, from the version's card (its intended use and
    validation population) and its threshold."""
    use = ((card or {}).get("scope") or {}).get("intended_use") or {}
    ages, views = use.get("age_years"), use.get("views")
    population = use.get("population") or "the population of its model card"
    scope = " ".join(part for part in (
        "/".join(use.get("modalities") or []) or None,
        f"{'/'.join(views)} view" if views else None,
        "chest radiographs",
        f"of patients aged {ages[0]}-{ages[1]} years" if ages and len(ages) == 2 else None,
    ) if part)
    return (
        f"Intended use: decision support for a radiologist reading {scope}. Validated on: "
        f"{population}. Decision support, not a diagnosis: this result is unverified until a "
        f"radiologist has read the images. The probability is the model's score for pneumonia; a "
        f"finding is Present when it is at or above the threshold {threshold:.4f} and Absent below "
        "it; it is not the chance that this patient has pneumonia, and it holds only within the "
        "validated population. Images outside the intended use are not assessed (Undetermined, "
        "with the reason). A heat map shows what the model weighted, not where disease is."
    )


def _evidence(source: Dataset) -> Dataset:
    """The header highdicom references: values invalid for their VR dropped (see
    `drop_invalid_values`), missing type 2 patient/study attributes added empty."""
    evidence = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            evidence.add(element)
    drop_invalid_values(evidence)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    return evidence


def _image_group(
    finding: ImageFinding, algorithm: AlgorithmIdentification, model_name: str, model_version: str,
    picture: Dataset | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    """One image's TID 1501 group: Present/Absent and the probability for a classified image;
    Undetermined and a "not assessed" comment with the reason for a refused one; its picture."""
    sop_uid = str(finding.source.SOPInstanceUID)
    assessed = not finding.not_assessed
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_uid, model_name, model_version]),
            # A TEXT item (UT): the whole UID, never cut (issue 22 found it cut mid-UID).
            identifier=f"pneumonia classification of {sop_uid}",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup(str(finding.source.SOPClassUID), sop_uid)],
        qualitative_evaluations=[QualitativeEvaluation(
            PNEUMONIA, UNDETERMINED if not assessed else PRESENT if finding.present else ABSENT)],
        measurements=[Measurement(
            name=PROBABILITY, value=round(float(finding.probability), 6), unit=NO_UNITS,
            algorithm_id=algorithm,
        )] if assessed else None,
    )
    if not assessed:
        group[0].ContentSequence.append(TextContentItem(
            name=codes.DCM.Comment, value=f"not assessed: {finding.not_assessed}",
            relationship_type=RelationshipTypeValues.CONTAINS,
        ))
    if picture is not None:
        group[0].ContentSequence.append(ImageContentItem(
            name=codes.DCM.IllustrationOfFinding, referenced_sop_class_uid=str(picture.SOPClassUID),
            referenced_sop_instance_uid=str(picture.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        ))
    return group


def _series_description(model_name: str, model_version: str) -> str:
    """'AI pneumonia <model> <version>' where it fits Series Description (LO, 64 characters);
    otherwise without them, as a name or version cut short would identify another one."""
    description = f"AI pneumonia {model_name} {model_version}"
    return description if len(description) <= 64 else "AI pneumonia classification"


def algorithm_equipment(
    model_name: str, model_version: str, model_sha256: str | None
) -> hd.ContributingEquipment:
    """The AIR Contributing Equipment item naming the version (for the SR and the pictures)."""
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # highdicom allows CID 7005 only
        manufacturer_model_name=model_name,  # highdicom raises on a value over 64 characters
        software_versions=model_version,
        contribution_description="AI pneumonia classification (unverified)",
    )
    equipment.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(PROCESSING_ALGORITHM)]
    equipment.DeviceUID = device_uid(model_name, model_version, model_sha256)
    return equipment


def build_sr(
    findings: list[ImageFinding], model_name: str, model_version: str, threshold: float, *,
    model_sha256: str | None = None, card: Mapping[str, Any] | None = None,
    pictures: Mapping[str, Dataset] | None = None,
) -> ComprehensiveSR:
    """The study's SR; `findings` must share one StudyInstanceUID. `pictures`: the header of each
    image's picture by the image's SOP Instance UID (referenced, and listed as evidence)."""
    if not findings:
        raise ValueError("findings must not be empty: an SR needs at least one image")
    study_uids = {str(f.source.StudyInstanceUID) for f in findings}
    if len(study_uids) != 1:
        raise ValueError(f"findings span {len(study_uids)} studies; one SR per study")
    study_uid = study_uids.pop()
    series_uid, instance_uid = sr_uids(study_uid, model_name, model_version)
    algorithm = AlgorithmIdentification(
        name=model_name, version=model_version, parameters=[f"threshold={threshold:.6f}"]
    )
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(model_name, model_version, model_sha256),
            name=model_name, manufacturer_name=MANUFACTURER, model_name=model_name,
        ),
    )
    pictures = pictures or {}
    groups = [_image_group(f, algorithm, model_name, model_version,
                           pictures.get(str(f.source.SOPInstanceUID))) for f in findings]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=CHEST_RADIOGRAPH,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(TextContentItem(
        name=INTENDED_USE, value=intended_use_text(threshold, card),
        relationship_type=RelationshipTypeValues.CONTAINS,
    ))
    return ComprehensiveSR(
        evidence=[*(_evidence(f.source) for f in findings), *pictures.values()],
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[algorithm_equipment(model_name, model_version, model_sha256)],
        series_description=_series_description(model_name, model_version),
    )
