"""Export: ONNX (fp32, int8), OpenVINO, TensorRT and Triton model repositories."""
