"""Serve: everything between a decoded file and a probability for a registered version.

Decode (DICOM pixels to grey), the one preprocessing (image), load a version and its feature
model (models), the pixel check (pixelcheck) and the header's scope facts (header). The worker,
the site tools (`accept`, `calibrate`, `adapt`) and training all call it, so every image becomes
the same array. Imports only the ground (core/).
"""
