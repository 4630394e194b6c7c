"""SAM-family generalists behind one interface: ``encode(slices)`` then ``decode(embeddings, prompts)``.

    g = get_generalist("litemedsam", device="cpu")      # built once, cached
    emb = g.encode(slices, intensity_window)            # N x H x W raw intensities of one scan
    masks = g.decode(emb, boxes, points)                # N x H x W bool, on the slice grid
"""

from fmabs_core.generalist.base import Embeddings, Generalist, SliceGeometry, intensity_range
from fmabs_core.generalist.models import GENERALISTS, LiteMedSAM, MedSAM, MobileSAM, SAM, canonical_name, clear_cache, get_generalist
from fmabs_core.generalist.prompts import Prompt, jitter_box, mask_box, sample_points, slice_prompts

__all__ = [
    "Embeddings",
    "GENERALISTS",
    "Generalist",
    "LiteMedSAM",
    "MedSAM",
    "MobileSAM",
    "Prompt",
    "SAM",
    "SliceGeometry",
    "canonical_name",
    "clear_cache",
    "get_generalist",
    "intensity_range",
    "jitter_box",
    "mask_box",
    "sample_points",
    "slice_prompts",
]
