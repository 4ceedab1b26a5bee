"""The DICOM node: a pynetdicom SCP that stores instances durably and queues them."""
