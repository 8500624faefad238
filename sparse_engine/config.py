"""Configuration of a sparse adapter, validated on construction."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from sparse_engine.kernels.runtime import SCORES as KERNEL_SCORES

SCORES = (*KERNEL_SCORES, "gd")  # gd: drop by |Ŵ|, grow by |G| (two kernel top-ks)
BACKENDS = ("auto", "triton", "reference")
SUPPORTED_BLOCK_SIZES = (16,)
DEFAULT_TARGET_MODULES = ("qkv_proj",)
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj")


@dataclass
class SparseAdapterConfig:
    """What to adapt and how the mask is chosen (Algorithm 1 of the paper).

    keep_ratio: fraction of each target weight that is trainable, in (0, 1].
    block_size: ``None`` for element-sparse adapters, ``16`` for 16×16 block-sparse ones.
    target_modules: names (last component, or full dotted suffix) of the ``nn.Linear``
        modules to adapt. Default: Phi-3's fused ``qkv_proj``; Llama-style models use
        ``("q_proj", "k_proj", "v_proj")``.
    score: mask score: ``mcs`` (Ŵ·∂L/∂Ŵ, signed; the paper's choice), ``snip`` (|Ŵ·g|),
        ``gm`` (|g|), ``wm`` (|Ŵ|) or ``gd`` (drop by |Ŵ|, grow by |g|).
    update_interval: optimizer steps between mask updates during the mask epochs.
    mask_epochs: epochs during which the mask is updated; it is frozen afterwards.
    layer_drop: one global top-k over all layers (Eq. 5-6) instead of k per layer;
        layers left with nothing above the threshold stop training. Not with ``gd``.
    seed: seed of anything random in the adapter (none today: Ŵ starts at zero).
    backend: ``auto`` (Triton on CUDA tensors, the PyTorch reference on CPU),
        ``triton`` or ``reference``.
    compact_search: after the first mask update, train only the kept entries (their
        gradient and optimizer moments compact; the other entries' last values in a dense
        buffer). ``False`` keeps Ŵ, its gradient and moments dense until the freeze (same
        masks and values, about 2.7× the memory at keep 0.1).
    """

    keep_ratio: float = 0.1
    block_size: int | None = None
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGET_MODULES)
    score: str = "mcs"
    update_interval: int = 100
    mask_epochs: int = 1
    layer_drop: bool = False
    seed: int = 0
    backend: str = "auto"
    compact_search: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        if not (math.isfinite(self.keep_ratio) and 0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        self.keep_ratio = float(self.keep_ratio)
        if self.block_size is not None and self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be None (element-sparse) or one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size!r}"
            )
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.layer_drop and self.score == "gd":
            raise ValueError("layer_drop ranks one score over all layers; gd drops and grows within each layer "
                             "(use mcs, snip, gm or wm with layer_drop)")
        for name in ("update_interval", "mask_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.compact_search, bool):
            raise ValueError(f"compact_search must be True or False, got {self.compact_search!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def kept_count(self, d_out: int, d_in: int) -> int:
        """Entries kept per layer: k = keep_ratio·d_out·d_in (in blocks of B×B when block-sparse).

        Rounded to the nearest integer, at least one unit.
        """
        units = d_out * d_in if self.block_size is None else (d_out // self.block_size) * (d_in // self.block_size)
        return max(1, min(units, int(round(self.keep_ratio * units))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SparseAdapterConfig":
        d = {k: (tuple(v) if k == "target_modules" else v) for k, v in d.items()}
        if d.get("score") == "gd" and d.get("layer_drop"):
            # files written before this pair was refused: their masks were chosen per layer
            # (layer drop was ignored for gd), which is what the loaded config now says
            d["layer_drop"] = False
        return cls(**d)
