"""The face: commands, dashboard, status, metrics, supervisor, retention, the simulated sender.

The only package that imports several parts (core, dicom_node, worker, training).
"""
