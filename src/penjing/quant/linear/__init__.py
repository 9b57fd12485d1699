"""Linear (uniform) quantization: the arithmetic, the config, observers, fake quantizers,
their placement on a traced graph or as hooks, BatchNorm folding, PTQ and QAT, dynamic
INT8, smoothing, mixed precision, and the file format of quantized models."""
