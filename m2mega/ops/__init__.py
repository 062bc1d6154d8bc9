"""Compiled and reference data-path ops (``csrc/`` extension with plain-torch fallbacks)."""

from m2mega.ops.vision_pack import PackedImages, pack_images, smart_resize, vision_metadata

__all__ = ["PackedImages", "pack_images", "smart_resize", "vision_metadata"]
