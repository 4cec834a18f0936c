"""The one results record: what ``towerrec-train``, ``towerrec-eval`` (ranking and ``task=audience``), a
rolling backtest and ``towerrec-reproduce`` write (``metrics.json``; ``reproduce.json``) and what every
reader reads.

A record is a :class:`Results`: its ``kind`` (which command wrote it), the split it scored, the data it
scored (name, config hash, split settings) and one :class:`ModelResult` per scorer, each a role
(``trained`` or ``baseline``) and ``{slice: {metric@k: value}}``. What only some kinds have sits in
named fields: ``val`` and ``run`` (a training run's selection), ``folds`` (a backtest's folds),
``header`` (a reproduction's data hash, commit and timings; an audience run's task, cut-offs, paired
tests and blend). The file also holds ``format`` and
``version``; :func:`read_results` refuses any other file, including the shapes written before this
record existed, in one line that names the file.

Standard library only: a notebook or a script reads results without torch or the training stack.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from towerrec.fileio import write_json

Slices = dict[str, dict[str, float | None]]

FORMAT = "towerrec.results"
VERSION = 1
#: Which command wrote a record.
KINDS = ("train", "eval", "backtest", "reproduce", "audience")
#: What a scorer is: a trained two-tower model, a baseline, or a blend of the model with baselines.
ROLES = ("trained", "baseline", "blend")
#: The name of a trained model's scores in a train or backtest record.
TRAINED = "two_tower"


class ResultsError(ValueError):
    """A file that is not a results record of this version (the message is one line naming the file)."""


@dataclass
class ModelResult:
    """One scorer's results.

    Args:
        role: ``trained`` or ``baseline``.
        metrics: ``{slice: {metric@k: value}}`` (a value is None where the slice has no users).
        std: sample standard deviation over seeds, same keys (a reproduction's trained models).
        interval: ``{slice: {metric@k: [low, high]}}``, 95% bootstrap intervals over users.
        details: what a reproduction keeps per model (overrides, seeds, runs, the paired test).
    """

    role: str
    metrics: Slices
    std: Slices = field(default_factory=dict)
    interval: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)


@dataclass
class Results:
    """A results record (see the module docstring).

    Args:
        kind: ``train``, ``eval``, ``backtest``, ``reproduce`` or ``audience``.
        split: the split scored: ``test`` or ``val``.
        data: the data scored: ``name``, ``config_hash`` and, where known, ``split`` (the split settings).
        models: scorer name -> its results.
        val: a training run's best validation value(s), ``{"best_<metric>": value}``.
        run: a training run's ``best_checkpoint``, ``best_epoch``, ``seed`` and ``refit``.
        folds: a backtest's folds, oldest first: ``fold``, ``dir`` and each scorer's slices in ``models``.
        header: a reproduction's header (data fingerprint, commit, timings, seeds, comparison); an
            audience run's task (customers, items, cut-offs, paired tests, blend weights, folds).
    """

    kind: str
    split: str
    data: dict
    models: dict[str, ModelResult]
    val: dict[str, float | None] = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    folds: list[dict] = field(default_factory=list)
    header: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ResultsError(f"results kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for name, model in self.models.items():
            if model.role not in ROLES:
                raise ResultsError(f"model {name!r}: role {model.role!r} is not one of {', '.join(ROLES)}")

    def scores(self, model: str | None = None) -> Slices:
        """``{slice: {metric@k: value}}`` of ``model``, or of the only scorer when None."""
        if model is None:
            if len(self.models) != 1:
                raise ResultsError(f"{len(self.models)} scorers in this {self.kind} record: name one of {list(self.models)}")
            model = next(iter(self.models))
        return self.models[model].metrics

    def as_dict(self) -> dict:
        """The record as written: ``format`` and ``version`` first, then the fields."""
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def write(self, path: str | Path) -> Path:
        """Write the record to ``path`` atomically (NaN as null)."""
        return write_json(path, self.as_dict())


#: The name of the model-and-baselines blend of an audience record.
BLEND = "blend"


def role_of(name: str) -> str:
    """The role of a scorer of towerrec-train or towerrec-eval: ``two_tower`` is trained, ``blend`` a
    blend, others baselines."""
    return "trained" if name == TRAINED else "blend" if name == BLEND else "baseline"


def single(kind: str, split: str, data: dict, name: str, metrics: Slices, **fields) -> Results:
    """A record of one scorer (its role from :func:`role_of`)."""
    return Results(kind, split, data, {name: ModelResult(role_of(name), metrics)}, **fields)


_FIELDS = {"kind": str, "split": str, "data": dict, "models": dict, "val": dict, "run": dict, "folds": list, "header": dict}
_MODEL_FIELDS = {"role": str, "metrics": dict, "std": dict, "interval": dict, "details": dict}


def from_dict(raw: object, source: str | Path) -> Results:
    """A :class:`Results` from its JSON form; :class:`ResultsError` naming ``source`` for anything else."""

    def refuse(why: str) -> ResultsError:
        return ResultsError(
            f"{source}: not a towerrec results record of version {VERSION} ({why}); re-run the command that wrote it"
        )

    if not isinstance(raw, dict):
        raise refuse(f"a JSON {type(raw).__name__}, not an object")
    if raw.get("format") != FORMAT:
        raise refuse(f"format {raw.get('format')!r}, expected {FORMAT!r}" if "format" in raw else "no format field")
    if raw.get("version") != VERSION:
        raise refuse(f"version {raw.get('version')!r}")
    unknown = set(raw) - set(_FIELDS) - {"format", "version"}
    if unknown:
        raise refuse(f"unknown field(s) {', '.join(sorted(unknown))}")
    for name, kind in _FIELDS.items():
        required = name in ("kind", "split", "data", "models")
        if (required or name in raw) and not isinstance(raw.get(name), kind):
            raise refuse(f"field {name!r} missing or not a {kind.__name__}")
    models = {}
    for name, model in raw["models"].items():
        if not isinstance(model, dict) or set(model) - set(_MODEL_FIELDS):
            raise refuse(f"models.{name} is not a model result")
        for key, kind in _MODEL_FIELDS.items():
            if (key in ("role", "metrics") or key in model) and not isinstance(model.get(key), kind):
                raise refuse(f"models.{name}.{key} missing or not a {kind.__name__}")
        models[name] = ModelResult(**model)
    fields = {k: raw[k] for k in _FIELDS if k in raw and k != "models"}
    try:
        return Results(models=models, **fields)
    except ResultsError as err:
        raise refuse(str(err)) from None


def read_results(path: str | Path) -> Results:
    """Read a results record; anything else (another JSON, an older shape, not JSON) raises
    :class:`ResultsError` in one line naming ``path``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not JSON ({err})") from None
    except OSError as err:
        raise ResultsError(f"{path}: cannot be read ({err.strerror or err})") from None
    return from_dict(raw, path)
