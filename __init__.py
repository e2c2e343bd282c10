"""Content-Style Adapters: learn a content and a style separately, combine them freely.

ComfyUI loads this folder as a custom node pack and calls ``comfy_entrypoint``. The node classes are
only imported when ComfyUI is importable, so ``core/`` (the tensor math) can be imported and tested alone.
"""
try:
    import comfy.utils  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
__version__ = "0.1.0"
