"""Models of known quality made from a screen's own cells: what ``vcjax demo`` sweeps.

Every screen splits each condition's cells into two halves; the truth is the first half's
pseudobulk. The second half gives predictions whose quality is known without a model:

* ``other half``: the second half's pseudobulk (the technical-duplicate baseline as a
  model): as good as a prediction can be without the truth's own cells;
* ``other half + noise``: the same plus Gaussian noise, per gene, of the size of its own
  Δ over perturbations (signal-to-noise 1);
* ``effects halved``: ``r + ½ (other half − r)`` for the Δ reference ``r``: a model that
  has partly collapsed towards the mean response;
* ``collapsed``: the Δ reference for every perturbation: a model that predicts the mean
  response and nothing perturbation-specific (calibrated scores near or below 0).

Expected order: ``other half`` first, ``collapsed`` last, the two others between.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from vcjax.pipeline._screen import Screen

__all__ = ["known_models"]


def known_models(screen: Screen, *, seed: int = 0) -> dict[str, ad.AnnData]:
    """The models of known quality of ``screen`` (module docstring), one row per
    (covariate,) perturbation, in the screen's order and genes."""
    spec = screen.spec
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _NAMES}
    obs = []
    rng = np.random.default_rng([int(seed), 0xDE70])
    for s in screen.strata:
        half = np.asarray(s.baselines["technical_duplicate"], np.float64)
        ref = np.broadcast_to(np.asarray(s.reference, np.float64), half.shape)
        delta = half - ref
        sd = np.sqrt(np.mean(delta * delta, axis=0))  # per gene, over perturbations
        parts["other half"].append(half)
        parts["other half + noise"].append(half + rng.normal(size=half.shape) * sd)
        parts["effects halved"].append(ref + 0.5 * delta)
        parts["collapsed"].append(np.array(ref))
        rows = {spec.key: list(s.perturbations)}
        if spec.covariate is not None:
            rows[spec.covariate] = [s.covariate] * len(s.perturbations)
        obs.append(pd.DataFrame(rows))
    frame = pd.concat(obs, ignore_index=True)
    frame.index = [f"row{i}" for i in range(len(frame))]
    out = {}
    for name, mats in parts.items():
        a = ad.AnnData(np.concatenate(mats).astype(np.float32), obs=frame.copy())
        a.var_names = list(screen.genes)
        out[name] = a
    return out


_NAMES = ("other half", "other half + noise", "effects halved", "collapsed")
