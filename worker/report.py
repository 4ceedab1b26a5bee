"""The DICOM SR for one study and model version, built with highdicom (TID 1500).

One image-level group (TID 1501) per image the version looked at: Pneumonia (SCT 233604007)
Present/Absent with the probability as a measurement for a classified image; Undetermined with a
"not assessed" comment and its reason for one outside the version's validated scope (never Absent
for what was not assessed); the algorithm (TID 4019) in both. UIDs derive from (study, model,
version), so a re-built SR replaces the earlier one at the PACS instead of adding another.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
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
) -> MeasurementsAndQualitativeEvaluations:
    """One image's TID 1501 group: Present/Absent and the probability for a classified image;
    Undetermined and a "not assessed" comment with the reason for a refused one."""
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
    return group


def _series_description(model_name: str, model_version: str) -> str:
    """'AI pneumonia <model> <version>' where it fits Series Description (LO, 64 characters);
    otherwise without them, as a name or version cut short would identify another one."""
    description = f"AI pneumonia {model_name} {model_version}"
    return description if len(description) <= 64 else "AI pneumonia classification"


def build_sr(
    findings: list[ImageFinding], model_name: str, model_version: str, threshold: float
) -> ComprehensiveSR:
    """The study's SR; `findings` must share one StudyInstanceUID."""
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
            uid=generate_uid(entropy_srcs=[model_name, model_version]),
            name=model_name, manufacturer_name=MANUFACTURER, model_name=model_version,
        ),
    )
    groups = [_image_group(f, algorithm, model_name, model_version) for f in findings]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=CHEST_RADIOGRAPH,
        imaging_measurements=groups,
    )
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        contribution_description="AI pneumonia classification (unverified)",
    )
    return ComprehensiveSR(
        evidence=[_evidence(f.source) for f in findings],
        content=report,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
        series_description=_series_description(model_name, model_version),
    )
