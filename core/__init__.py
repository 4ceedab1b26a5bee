"""The ground: settings, database, model contract and registry, TLS, scope, PHI scrubbing, queue names.

Imports nothing of ours above it (ops, dicom_node, worker, training) and never Keras.
"""
