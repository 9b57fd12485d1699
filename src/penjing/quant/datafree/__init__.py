"""Data-free quantization (Nagel et al.): cross-layer equalization, high-bias absorption
and bias correction."""
