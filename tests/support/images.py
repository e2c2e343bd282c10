"""Checks on images a real ComfyUI server wrote."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def expected_image_size(graph: dict, save_node: str) -> tuple[int, int] | None:
    """(width, height) a SaveImage must have when it saves a VAEDecode of the graph's only EmptyLatentImage."""
    source = graph[save_node]["inputs"]["images"][0]
    if graph[source]["class_type"] != "VAEDecode":
        return None
    sizes = {(n["inputs"]["width"], n["inputs"]["height"]) for n in graph.values() if n["class_type"] == "EmptyLatentImage"}
    return sizes.pop() if len(sizes) == 1 else None


def assert_real_images(paths: list[Path], size: tuple[int, int] | None) -> None:
    assert paths, "the workflow saved no image"
    for path in paths:
        assert path.is_file(), f"{path} was reported but does not exist"
        with Image.open(path) as image:
            if size is not None:
                assert image.size == size, f"{path.name}: size {image.size}, expected {size}"
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert np.isfinite(pixels).all()
        assert pixels.std() > 1.0, f"{path.name} is (nearly) constant: std {pixels.std():.3f}"
