"""Which image-stage epoch a run keeps, and when its patience runs out (early stopping)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .evaluate import EXPECTED_METRICS


class BestEpoch:
    """The best validation so far (Rank-1, then mAP on a tie): its epoch, its values and a
    snapshot of the weights then (B9), and the epochs since without a better one.

    ``patience``: stop after this many epochs without a better one (0: never), unless the last
    epoch has come anyway. The checkpoint keeps ``best`` and ``patience`` under those names.
    """

    def __init__(self, patience: int, epochs: int):
        self.limit = patience
        self.epochs = epochs
        self.best: dict[str, Any] = {"rank1": -1.0, "mAP": -1.0, "epoch": None, "state": None}
        self.patience = 0  # epochs since the best one

    def observe(self, epoch: int, val: dict[str, float],
                snapshot: Callable[[], dict[str, Any]]) -> bool:
        """Record one epoch's validation; True when it is the new best (``snapshot`` taken)."""
        improved = (val["rank1"], val["mAP"]) > (self.best["rank1"], self.best["mAP"])
        if improved:
            self.best.update(rank1=val["rank1"], mAP=val["mAP"], epoch=epoch,
                             **{name: val[name] for name in EXPECTED_METRICS}, state=snapshot())
            self.patience = 0
        else:
            self.patience += 1
        return improved

    def exhausted(self, epoch: int) -> bool:
        """Patience has run out before the stage's last epoch."""
        return bool(self.limit) and self.patience >= self.limit and epoch < self.epochs

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "patience": self.patience}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.patience = dict(state["best"]), state["patience"]
