"""The `ascend` target: Huawei Ascend NPUs through CANN's ATC (ONNX -> .om).

Modules: profile (what ATC accepts), checker (graph vs profile), static_export (fixed-shape graphs
from the eager model), atc (build_om.sh + running atc), emulation (fp16 numerics on ORT CPU),
kit/ (the on-device verification kit shipped in the package).
"""
