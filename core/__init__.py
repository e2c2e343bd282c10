"""Tensor math and file handling for Content-Style Adapters.

Everything here imports only torch and safetensors (never ComfyUI), so it can be read and tested on its
own. ``nodes/`` translates between ComfyUI objects and these functions.
"""
