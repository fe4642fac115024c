"""Model compression: quantization (int8/int4), QAT, distillation, pruning."""
