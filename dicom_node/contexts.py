"""Which SOP classes and transfer syntaxes the node accepts.

Every storage class is accepted, so a PACS that routes a whole study never sees an error for a
lateral, a CT localiser or a presentation state; the worker records those as `ignored` with the
reason. Transfer syntaxes are the ones pydicom + pylibjpeg decode.
"""

from typing import cast

from pydicom import uid
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless,
    uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless,
    uid.JPEG2000, uid.RLELossless,
]

# Each of pynetdicom's storage contexts is built with its abstract syntax (never None).
STORAGE_SOP_CLASSES = [cast(uid.UID, context.abstract_syntax) for context in StoragePresentationContexts]
VERIFICATION_SOP_CLASS = Verification
