"""fmabs_core: three drawn slices per scan -> a custom 3D segmentation model (FM-ABS, CFR)."""

__version__ = "0.1.0"
