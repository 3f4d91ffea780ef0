"""A complete omnistream modality in under 60 lines: 1-D sensor series (.csv) as quantised levels."""

import io
from typing import ClassVar

import numpy as np
from pydantic import Field

from omnistream.modalities import BadSample, BaseModality, ModalityOptions


class SensorOptions(ModalityOptions):
    levels: int = Field(64, ge=2, le=4096, description="quantisation levels = vocabulary size")
    max_samples: int = Field(4096, ge=1, description="longer series are refused (untrusted-input bound)")


class SensorModality(BaseModality):
    name: ClassVar[str] = "sensor"
    version: ClassVar[str] = "1"
    keys: ClassVar[tuple[str, ...]] = ("csv",)
    Options = SensorOptions
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25}
    error_bound: ClassVar[float] = 0.02  # mean |x - decode(encode(x))| / (fitted range)

    @property
    def vocab_size(self) -> int:
        return self.options.levels

    def decode_bytes(self, ext: str, data: bytes) -> np.ndarray:
        try:
            x = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.float64, ndmin=1)
        except ValueError as e:
            raise BadSample("sensor_unparsable", str(e)[:200]) from None
        if x.size == 0 or x.size > self.options.max_samples or not np.isfinite(x).all():
            raise BadSample("sensor_out_of_bounds", f"{x.size} samples")
        return x.ravel()

    def fit(self, features: list[np.ndarray]) -> None:
        allx = np.concatenate(features)
        self.lo, self.hi = float(allx.min()), float(allx.max())
        self._mark_fitted()

    def encode(self, obj: np.ndarray) -> np.ndarray:
        scaled = (np.clip(obj, self.lo, self.hi) - self.lo) / max(self.hi - self.lo, 1e-12)
        return np.rint(scaled * (self.options.levels - 1)).astype(np.int64)

    def decode(self, ids) -> np.ndarray:
        return self.lo + np.asarray(ids) / (self.options.levels - 1) * (self.hi - self.lo)

    def roundtrip_error(self, obj: np.ndarray, decoded: np.ndarray) -> float:
        return float(np.abs(obj - decoded).mean() / max(self.hi - self.lo, 1e-12))

    def to_bytes(self, obj: np.ndarray) -> tuple[str, bytes]:
        return "csv", ",".join(f"{v:.6g}" for v in obj).encode()

    def _state(self) -> dict:
        return {"lo": self.lo, "hi": self.hi}

    def _set_state(self, state: dict) -> None:
        self.lo, self.hi = float(state["lo"]), float(state["hi"])
