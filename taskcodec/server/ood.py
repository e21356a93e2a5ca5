"""Out-of-domain flag: frames whose decoded symbols are far from everything the model was trained on are stored as
"unknown" instead of being given a class.

The bundle manifest's optional ``ood`` section (written by `taskcodec export`) names the score and its threshold,
chosen on held-out in-domain frames for a stated false-alarm rate::

    "ood": {"score": "knn", "k": 10, "threshold": 3.52, "false_alarm_rate": 0.01,
            "calibration": {"data": "fashion-mnist", "split": "test[0::2]", "frames": 5000}}

Scores (higher = more surprising), all computed from the symbols the server decodes anyway:

* ``knn``: mean Euclidean distance from the symbols to their ``k`` nearest rows of a reference set of training-frame
  symbols (the bundle file with role ``ood_reference``, int32 [R, D]). Measured best (`taskcodec bench ood`).
* ``bits``: the frame's information content under the bundle's entropy tables (-log2 P, what the coder spends).
"""

from __future__ import annotations

import numpy as np

from taskcodec.bundle import Bundle, BundleError

UNKNOWN = -1
UNKNOWN_NAME = "unknown"
SCORES = ("knn", "bits")
REFERENCE_ROLE = "ood_reference"


def knn_score(symbols: np.ndarray, reference: np.ndarray, k: int, block: int = 512) -> np.ndarray:
    """Mean distance to the k nearest reference rows, per row of ``symbols`` (float64, exact for int symbols)."""
    q = np.asarray(symbols, np.float64).reshape(len(symbols), -1)
    ref = np.asarray(reference, np.float64)
    k = min(int(k), len(ref))
    ref_sq = (ref * ref).sum(1)
    out = np.empty(len(q))
    for i in range(0, len(q), block):
        x = q[i:i + block]
        d2 = np.maximum((x * x).sum(1)[:, None] + ref_sq[None, :] - 2.0 * x @ ref.T, 0.0)
        nearest = np.partition(d2, k - 1, axis=1)[:, :k]
        out[i:i + block] = np.sqrt(nearest).mean(1)
    return out


class OutOfDomain:
    """The bundle's calibrated out-of-domain test; ``from_bundle`` returns None for bundles without one."""

    def __init__(self, score: str, threshold: float, k: int = 10, reference: np.ndarray | None = None,
                 tables=None):
        if score not in SCORES:
            raise BundleError(f"unknown out-of-domain score {score!r} (known: {', '.join(SCORES)})")
        if score == "knn" and (reference is None or len(reference) == 0):
            raise BundleError("the knn out-of-domain score needs a non-empty reference set")
        self.score_name, self.threshold, self.k = score, float(threshold), int(k)
        self.reference, self.tables = reference, tables

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "OutOfDomain | None":
        spec = bundle.manifest.get("ood")
        if not spec:
            return None
        try:
            reference = None
            if spec["score"] == "knn":
                with np.load(bundle.file(REFERENCE_ROLE), allow_pickle=False) as z:
                    reference = np.asarray(z["symbols"], np.int32)
                if reference.ndim != 2 or reference.shape[1] != bundle.latent_dim:
                    raise BundleError(f"ood reference has shape {reference.shape}, expected [R, {bundle.latent_dim}]")
            return cls(spec["score"], spec["threshold"], spec.get("k", 10), reference, bundle.tables)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise BundleError(f"bundle {bundle.path}: unusable ood section ({exc!r})") from exc

    def scores(self, symbols: np.ndarray) -> np.ndarray:
        symbols = np.asarray(symbols)
        if self.score_name == "knn":
            return knn_score(symbols, self.reference, self.k)
        return self.tables.estimated_bits(symbols.astype(np.int32))

    def flags(self, symbols: np.ndarray) -> np.ndarray:
        """True where a frame is out of the model's domain (score strictly above the threshold)."""
        return self.scores(symbols) > self.threshold
