"""The built-in phantom generator behind ``medssl demo``: labeled multi-modality data, nothing downloaded."""

from medssl.demo.archive import DemoArchive, generate_demo_archive
from medssl.demo.phantoms import Phantom, Tissue, chest_ct, head_ct, mr_head, radiograph, ultrasound

__all__ = ["DemoArchive", "Phantom", "Tissue", "chest_ct", "generate_demo_archive", "head_ct", "mr_head",
           "radiograph", "ultrasound"]
