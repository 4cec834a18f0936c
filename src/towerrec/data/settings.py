"""Typed settings of a prepare run, built once from the ``data`` config at the entry point.

:func:`towerrec.data.build.prepare` reads these dataclasses, never a config object. A wrong
value is a one-line :class:`~towerrec.data.schema.DataError` naming the config field
(``data.split.test_days: ...``), raised before any file is read.

:func:`config_hash` identifies what determines a processed folder. Reports print it as the "data
hash", so its value for a given config must not change when code moves around.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from towerrec.data.engine import EngineSettings
from towerrec.data.schema import DataError, RawDataset
from towerrec.fileio import text_sha256

PREPARE_VERSION = 4
SPLIT_METHODS = ("temporal", "leave_one_out", "rolling")

# The hash names a source by the import path it had when data hashes were first reported, so moving a
# loader into its own module does not change the hash of a config (and the reported data hashes).
_HASHED_TARGET = {
    "towerrec.data.sources.hm.load_hm": "towerrec.data.sources.load_hm",
    "towerrec.data.sources.movielens.load_movielens": "towerrec.data.sources.load_movielens",
    "towerrec.data.sources.table.load_table": "towerrec.data.sources.load_table",
    "towerrec.data.sources.synthetic.generate_synthetic": "towerrec.data.synthetic.generate_synthetic",
}


def config_hash(data_cfg: DictConfig | Mapping) -> str:
    """Hash of what determines the processed folder: the resolved data config and the code version.

    Where the data lives (``root``, ``source.root``, ``processed_dir``) is left out, so two checkouts
    of one commit report the same hash; what the input files hold is fingerprinted separately (the
    manifest's ``inputs`` for staleness, its per-file sha256 under ``sources`` for reports).
    Evaluation options (``eval``) and the engine's resources (``engine``) do not change the processed
    tables and are left out too.
    """
    if isinstance(data_cfg, DictConfig):
        cfg = OmegaConf.to_container(data_cfg, resolve=True)
    else:
        cfg = json.loads(json.dumps(dict(data_cfg), default=str))  # a deep copy
    cfg.pop("processed_dir", None)
    cfg.pop("root", None)
    source = cfg.get("source")
    if isinstance(source, dict):
        source.pop("root", None)
        if source.get("_target_") in _HASHED_TARGET:
            source["_target_"] = _HASHED_TARGET[source["_target_"]]
    cfg.pop("eval", None)
    cfg.pop("engine", None)  # resources: how fast the folder is built, not what it holds
    if cfg.get("time") == _TIME_DEFAULTS:
        # The outlier rule at its defaults changes nothing for data without outliers, the data every
        # hash reported before it existed was prepared from: those hashes stay valid.
        cfg.pop("time")
    return text_sha256(json.dumps({"v": PREPARE_VERSION, "cfg": cfg}, sort_keys=True, default=str))


@dataclass(frozen=True)
class FilterSettings:
    """Drop users and items with too few interactions (once, or iterated to a k-core)."""

    min_user_interactions: int = 0
    min_item_interactions: int = 0
    kcore: bool = False


@dataclass(frozen=True)
class SplitSettings:
    """How interactions become train / val / test (see :func:`towerrec.data.build.assign_split`).

    Attributes:
        method: ``temporal`` (global cut dates), ``leave_one_out`` (per user) or ``rolling`` (K
            consecutive temporal test windows at the end of the data, see :func:`rolling_cuts`).
        test_days, val_days: lengths of the temporal test and validation windows (``rolling``: the
            validation window before each test window, default ``window_days``).
        test_start, val_start: explicit temporal cut dates, instead of the window lengths.
        test_end: temporal only: interactions at or after this date are dropped before anything else
            (filters, ids, counts) sees them; the manifest counts them (``split.dropped_after_end``).
        folds, window_days: ``rolling``: the number K of test windows and the days in each (default
            ``test_days``, so ``method=rolling folds=1`` is the temporal split of the same config).
        fold: ``rolling``: which fold (0 = oldest .. K-1 = the last window) one processed folder
            holds; :mod:`towerrec.backtest` sets it for each fold's folder.
    """

    method: str = "temporal"
    test_days: int | None = None
    val_days: int | None = None
    test_start: str | None = None
    val_start: str | None = None
    test_end: str | None = None
    folds: int | None = None
    window_days: int | None = None
    fold: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPLIT_METHODS:
            raise DataError(f"data.split.method: unknown split method '{self.method}' ({' | '.join(SPLIT_METHODS)})")
        if self.method == "temporal":
            if self.test_start is None and self.test_days is None:
                raise DataError("data.split.test_days: the temporal split needs test_days (or test_start)")
            if self.val_start is None and self.val_days is None:
                raise DataError("data.split.val_days: the temporal split needs val_days (or val_start)")
        if self.method == "rolling":
            if self.folds is None or self.folds < 1:
                raise DataError(f"data.split.folds: the rolling split needs folds >= 1, got {self.folds!r}")
            if self.window is None or self.window < 1:
                raise DataError(f"data.split.window_days: the rolling split needs window_days >= 1 (or test_days), got {self.window!r}")
            if self.val_days is not None and self.val_days < 1:
                raise DataError(f"data.split.val_days: expected at least 1 day, got {self.val_days!r}")
            if self.fold is not None and not 0 <= self.fold < self.folds:
                raise DataError(f"data.split.fold: expected 0 <= fold < folds={self.folds}, got {self.fold}")
            for name in ("test_start", "val_start", "test_end"):
                if getattr(self, name) is not None:
                    raise DataError(f"data.split.{name}: not an option of the rolling split (its cut dates follow from folds and window_days)")

    @property
    def window(self) -> int | None:
        """``rolling``: the days of each test window, ``window_days`` (default ``test_days``)."""
        return self.window_days if self.window_days is not None else self.test_days


def rolling_cuts(split: SplitSettings, last_day: pd.Timestamp) -> list[dict[str, pd.Timestamp | None]]:
    """The cut dates of every fold of a rolling split, oldest first.

    The last fold is today's temporal split: ``test_start = last_day - window_days``, no end. Each
    earlier fold's test window ends where the next one's starts, and its validation window is the
    ``val_days`` (default ``window_days``) before its test window. So fold ``f`` of ``K``::

        test_start = last_day - (K - f) * window_days
        test_end   = test_start + window_days      (None for the last fold)
        val_start  = test_start - val_days
    """
    days, val_days = split.window, split.val_days or split.window
    cuts = []
    for f in range(split.folds):
        test_start = last_day - pd.Timedelta(days=(split.folds - f) * days)
        test_end = None if f == split.folds - 1 else test_start + pd.Timedelta(days=days)
        cuts.append({"val_start": test_start - pd.Timedelta(days=val_days), "test_start": test_start, "test_end": test_end})
    return cuts


@dataclass(frozen=True)
class TextSettings:
    """The hashing tokenizer of the item text: ``buckets`` hash values, ``max_tokens`` per item."""

    buckets: int = 4096
    max_tokens: int = 16


@dataclass(frozen=True)
class SegmentSettings:
    """Customer lifecycle windows, in days before the end of training (see ``customer_segments``)."""

    new_days: int = 30
    active_days: int = 30


@dataclass(frozen=True)
class TimeSettings:
    """Timestamps outside the data's plausible range: they would otherwise define the split's windows.

    Rows dated after the prepare run's clock, and an isolated tail (at most ``max_tail_share`` of the
    rows, after a gap of more than ``max_gap_days`` days without any interaction), are skipped and
    counted (``outliers: skip``, reasons ``timestamp_after_clock`` and ``timestamp_isolated_tail``), or
    stop the run with a one-line error (``outliers: error``).
    """

    outliers: str = "skip"
    max_gap_days: int = 365
    max_tail_share: float = 0.01


_TIME_DEFAULTS = dataclasses.asdict(TimeSettings())


@dataclass(frozen=True)
class PrepareSettings:
    """Everything :func:`~towerrec.data.build.prepare` needs. Build it with :meth:`from_config`.

    Attributes:
        name: the dataset name, recorded in the manifest.
        processed_dir: the folder to build.
        root: the raw input folder, fingerprinted for staleness.
        load: the configured source, called once per build; returns a :class:`RawDataset`. A source
            that takes a ``con`` argument gets the build's DuckDB connection and may return its
            interactions as the name of an engine table (out of core).
        engine: DuckDB's memory limit, threads and spill folder.
        time: what happens to implausible timestamps.
        image_size: side of the square image cache, in pixels.
        config: the resolved data config, recorded in the manifest.
        config_hash: :func:`config_hash` of that config.
    """

    name: str
    processed_dir: Path
    root: Path
    load: Callable[[], RawDataset]
    split: SplitSettings
    filter: FilterSettings
    text: TextSettings
    segments: SegmentSettings
    image_size: int
    config: dict
    config_hash: str
    engine: EngineSettings = EngineSettings()
    time: TimeSettings = TimeSettings()

    @classmethod
    def from_config(cls, data_cfg: DictConfig) -> PrepareSettings:
        """Check and convert the ``data`` config group; raise a one-line DataError on a bad field."""
        from hydra.utils import instantiate  # Hydra's instantiate is needed only here

        cfg = OmegaConf.to_container(data_cfg, resolve=True)
        for key in ("name", "processed_dir", "root", "source"):
            if cfg.get(key) is None:
                raise DataError(f"data.{key}: missing (every data config sets it)")
        # A partial, called later, so a DataError reaches the user as itself, not wrapped by Hydra.
        load = instantiate(data_cfg.source, _partial_=True)
        return cls(
            name=str(cfg["name"]),
            processed_dir=Path(cfg["processed_dir"]),
            root=Path(cfg["root"]),
            load=load,
            split=_group(SplitSettings, cfg, "split"),
            filter=_group(FilterSettings, cfg, "filter"),
            text=_group(TextSettings, cfg, "text"),
            segments=_group(SegmentSettings, cfg, "segments"),
            image_size=_convert(cfg.get("image_size"), int, "data.image_size"),
            config=cfg,
            config_hash=config_hash(cfg),
            engine=_group(EngineSettings, cfg, "engine"),
            time=_group(TimeSettings, cfg, "time"),
        )


def split_settings(data_cfg: dict) -> SplitSettings:
    """The checked :class:`SplitSettings` of a resolved ``data`` config (a one-line DataError if bad)."""
    return _group(SplitSettings, data_cfg, "split")


def _group(cls: type, cfg: dict, name: str) -> Any:
    """``cls`` from the ``data.<name>`` mapping: known fields only, each converted to its type."""
    values = cfg.get(name) or {}
    if not isinstance(values, dict):
        raise DataError(f"data.{name}: expected a mapping of settings, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DataError(f"data.{name}.{unknown[0]}: unknown setting (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)  # real types, whatever the annotation's spelling
    args = {}
    for key, value in values.items():
        field, kind = f"data.{name}.{key}", hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``T | None``: T, or None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind not in (int, bool, str, float):
            raise DataError(f"{field}: settings of type {kind!r} are not supported")
        args[key] = _convert(value, kind, field)
    return cls(**args)


def _convert(value: Any, kind: type, field: str) -> Any:
    """``value`` as ``kind`` (None stays None); a one-line DataError naming ``field`` otherwise."""
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise DataError(f"{field}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise DataError(f"{field}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(f"{field}: expected a number, got {value!r}")
        return float(value)
    return str(value)
