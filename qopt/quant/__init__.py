"""Quantization numerics: pure functions on tensors, nothing about models or search."""

from qopt.quant.arithmetic import fake_quantize_activations, lowprec_linear
from qopt.quant.outliers import InputTransform
from qopt.quant.weight import fake_quantize_weight, input_transform

__all__ = ["InputTransform", "fake_quantize_activations", "fake_quantize_weight", "input_transform", "lowprec_linear"]
