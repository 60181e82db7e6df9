"""Inference: the Predictor over a run folder, its engines (torch, ONNX Runtime, OpenVINO,
TensorRT), BN folding, embeddings and Grad-CAM.
"""
