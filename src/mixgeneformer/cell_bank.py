"""A memory of recent cells for the cross-species pairing (``model.cross_species_queue``).

The ``"mnn"`` cross-species term pairs each cell with its mutual nearest cell of the other
species. Inside one small batch the nearest other-species cell is often of another type (at 16
cells, 60% of the pairs share a type on the Baron pancreas data, stellate cells 13-21%;
``benchmarks/mnn_purity.py``); among about a thousand cells it is 80%. The bank keeps the last
``size`` training cells, each as its sparse ortholog profile (class and rank weight per token,
the profile norm), its species and its detached embedding, so the pairing searches batch + bank
and a partner found in the bank serves as a fixed positive key (as in MoCo / memory-bank
contrastive learning; the key is at most ``size / batch`` steps old).

The bank is training state, not a model weight: it is not in the model bundle and starts empty
(slots of species -1, never paired). Each process keeps its own bank under DDP, and each saves it
in every training checkpoint (``cell_bank_<rank>.safetensors``, :func:`save_cell_bank`), so a
resumed run pairs against the same earlier cells as a straight run (:func:`load_cell_bank`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_FIELDS = ("classes", "weights", "norms", "species", "keys")


def _pad_columns(values: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    return F.pad(values, (0, width - values.shape[1]), value=fill) if values.shape[1] < width else values


class CellBank:
    """Ring buffer of the last ``size`` cells' pairing profiles and embeddings (see the module doc)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.classes: torch.Tensor | None = None  # (size, L) long, -1 = no class
        self.weights: torch.Tensor | None = None  # (size, L) float
        self.norms: torch.Tensor | None = None  # (size,)
        self.species: torch.Tensor | None = None  # (size,) long, -1 = empty or unknown
        self.keys: torch.Tensor | None = None  # (size, D) detached embeddings
        self._next = 0

    def _allocate(self, width: int, dim: int, device: torch.device) -> None:
        self.classes = torch.full((self.size, width), -1, dtype=torch.long, device=device)
        self.weights = torch.zeros(self.size, width, device=device)
        self.norms = torch.zeros(self.size, device=device)
        self.species = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.keys = torch.zeros(self.size, dim, device=device)

    def _fit(self, width: int, dim: int, device: torch.device) -> None:
        """Allocate on first use; follow the batch's device; widen for a longer batch."""
        if self.keys is None or self.keys.shape[1] != dim:
            self._allocate(width, dim, device)
            self._next = 0
        if self.keys.device != device:
            for name in ("classes", "weights", "norms", "species", "keys"):
                setattr(self, name, getattr(self, name).to(device))
        if self.classes.shape[1] < width:
            self.classes = _pad_columns(self.classes, width, -1)
            self.weights = _pad_columns(self.weights, width, 0.0)

    def pool(
        self, classes: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, species: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's rows followed by the bank's: ``(classes, weights, norms, species)`` of the pool."""
        self._fit(classes.shape[1], dim, classes.device)
        width = self.classes.shape[1]
        return (
            torch.cat([_pad_columns(classes, width, -1), self.classes]),
            torch.cat([_pad_columns(weights.float(), width, 0.0), self.weights]),
            torch.cat([norms.float(), self.norms]),
            torch.cat([species.long(), self.species]),
        )

    def push(
        self, classes: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, species: torch.Tensor, z: torch.Tensor
    ) -> None:
        """Store a batch (oldest cells overwritten first); a batch larger than the bank keeps its last rows."""
        self._fit(classes.shape[1], z.shape[1], z.device)
        n = min(classes.shape[0], self.size)
        slots = (self._next + torch.arange(n, device=z.device)) % self.size
        width = self.classes.shape[1]
        self.classes[slots] = _pad_columns(classes[-n:], width, -1)
        self.weights[slots] = _pad_columns(weights[-n:].float(), width, 0.0)
        self.norms[slots] = norms[-n:].float()
        self.species[slots] = species[-n:].long()
        self.keys[slots] = z[-n:].detach().float()
        self._next = (self._next + n) % self.size


def bank_file(checkpoint: str | Path, rank: int) -> Path:
    """Where a checkpoint keeps the bank of process ``rank``."""
    return Path(checkpoint) / f"cell_bank_{int(rank)}.safetensors"


def save_cell_bank(model: torch.nn.Module, checkpoint: str | Path, rank: int) -> None:
    """Write ``model``'s bank (if it has one in use) into a checkpoint folder (every rank its own file)."""
    from safetensors.torch import save_file

    bank = getattr(model, "_cell_bank", None)
    if bank is None or bank.keys is None:
        return
    state = {name: getattr(bank, name).detach().cpu().contiguous() for name in _FIELDS}
    state["next"] = torch.tensor([bank._next, bank.size], dtype=torch.long)
    Path(checkpoint).mkdir(parents=True, exist_ok=True)
    save_file(state, str(bank_file(checkpoint, rank)))


def load_cell_bank(model: torch.nn.Module, checkpoint: str | Path, rank: int) -> None:
    """Give ``model`` the bank a checkpoint saved for process ``rank`` (none saved: the bank starts empty)."""
    from safetensors.torch import load_file

    size = int(getattr(model.config, "cross_species_queue", 0) or 0)
    path = bank_file(checkpoint, rank)
    if size <= 0 or not path.is_file():
        if size > 0:
            logger.warning("%s holds no cross-species queue for rank %d; it starts empty", checkpoint, rank)
        return
    state = load_file(str(path))
    bank = CellBank(size)
    for name in _FIELDS:
        setattr(bank, name, state[name])
    bank._next = int(state["next"][0])
    model._cell_bank = bank
