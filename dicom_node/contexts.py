"""Which SOP classes and transfer syntaxes the node accepts.

Every storage class is accepted, so a PACS that routes a whole study never sees an error for a
lateral, a CT localiser or a presentation state; the worker records those as `ignored` with the
reason. Transfer syntaxes are the ones pydicom + pylibjpeg decode.
"""

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import Verification

ACCEPTED_TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

STORAGE_SOP_CLASSES = [context.abstract_syntax for context in StoragePresentationContexts]
VERIFICATION_SOP_CLASS = Verification
