"""Using a model: the Python API (`MedMoE`), the HTTP server and int8 weight-only quantisation."""
