"""Which SOP classes and transfer syntaxes the node accepts.

Every storage class is accepted, so a PACS that routes a whole study never sees an error for a
lateral, a CT localiser or a presentation state; the worker records those as `ignored` with the
reason. Transfer syntaxes are the ones pydicom + pylibjpeg decode.
"""

from pydicom import uid
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import Verification

ACCEPTED_TRANSFER_SYNTAXES = [
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless,
    uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless,
    uid.JPEG2000, uid.RLELossless,
]

STORAGE_SOP_CLASSES = [context.abstract_syntax for context in StoragePresentationContexts]
VERIFICATION_SOP_CLASS = Verification
