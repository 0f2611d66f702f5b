"""Model bundles: the self-describing folder a trained model is shipped in, and everything that reads or writes it.

    from breastfusion.bundles import save_bundle, load_bundle, read_bundle_meta, refresh_bundle

Modules: :mod:`.bundle` (write and load a bundle folder: weights, ``bundle.json``, fitted preprocessing),
:mod:`.integrity` (checksums sealed into ``bundle.json`` and verified on load), :mod:`.card` (the generated
``MODEL_CARD.md``). Training writes bundles; prediction, ONNX export, evaluation and the service read them.
Names are imported on first use, so ``breastfusion.bundles.integrity`` loads without the network libraries.
"""

from __future__ import annotations

from breastfusion.utils import lazy_exports

_EXPORTS = {
    "Bundle": "bundle",
    "load_bundle": "bundle",
    "save_bundle": "bundle",
    "read_bundle_meta": "bundle",
    "refresh_bundle": "bundle",
    "write_bundle_meta": "integrity",
    "verify_bundle": "integrity",
    "META": "integrity",
    "WEIGHTS": "integrity",
    "SEGMENTER_FILE": "integrity",
    "model_card": "card",
    "CARD": "card",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
