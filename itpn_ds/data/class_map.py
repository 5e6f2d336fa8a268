"""Class maps: which class each label id means, so that a label means the same class everywhere.

``make-shards`` numbers the classes it finds (sorted names -> 0..C-1) unless told to number them as another
set (``--classes-from``); the map travels with the weights (checkpoint ``meta.json``, export ``config.json``,
the MLflow run) and every command that meets two maps compares them by name, before any work:

* :class:`ClassMap`: class name -> label id (classification and segmentation 0..K-1, detection 1..K), and
  for detection the annotation file's category id of each label 1..K. Stored as a manifest stores it:
  ``{"classes": {name: id, ...}, "category_ids": [...]}``.
* :func:`align`: a split's map against training's. Every class of the split must be one of training's (a
  name training lacks is refused, named); the :class:`Alignment` says which training id each of the split's
  ids is, and which training classes the split lacks.
* :func:`read_class_list`: the map of an existing shard set or a class-names file (``--classes-from``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from itpn_ds.data.annotations import CLASSIFICATION, IGNORE_INDEX
from itpn_ds.data.shards import Manifest
from itpn_ds.errors import UserError

SHOWN = 5  # class names a message lists before "..."


class ClassMapError(UserError, ValueError):
    """Two class maps that do not agree by name, or a stored map that cannot be read; names both sides."""


def short_list(names: list[str]) -> str:
    """``'a', 'b', ... (+N more)``: class names short enough for one line."""
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown}, ... (+{len(names) - SHOWN} more)"


@dataclass(frozen=True)
class ClassMap:
    """``ids``: class name -> label id, in id order; ``category_ids``: detection's annotation-file category id
    of each label 1..K (empty for the other kinds)."""

    ids: Mapping[str, int]
    category_ids: tuple[int, ...] = ()

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> "ClassMap":
        return cls(dict(sorted(manifest.classes.items(), key=lambda item: item[1])), tuple(manifest.category_ids))

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> "ClassMap | None":
        """The map stored in a ``meta.json`` / ``config.json`` (its ``classes`` and ``category_ids``); None when
        it stores none (written before class maps travelled with the weights)."""
        classes = raw.get("classes")
        if classes is None:
            return None
        category_ids = raw.get("category_ids") or []
        if (not isinstance(classes, Mapping) or not all(isinstance(v, int) for v in classes.values())
                or not all(isinstance(c, int) for c in category_ids)):
            raise ClassMapError(f"{where}: 'classes' must map class names to label ids and 'category_ids' list "
                                f"integers, got {str(classes)[:80]!r}")
        return cls(dict(sorted(classes.items(), key=lambda item: item[1])), tuple(category_ids))

    def to_json(self) -> dict[str, Any]:
        """``{"classes": {name: id}}``, with ``"category_ids"`` for detection: the keys ``from_json`` reads."""
        out: dict[str, Any] = {"classes": dict(self.ids)}
        if self.category_ids:
            out["category_ids"] = list(self.category_ids)
        return out

    @property
    def names(self) -> list[str]:
        """Class names in label-id order."""
        return sorted(self.ids, key=self.ids.__getitem__)

    def category_of(self, name: str) -> int:
        """Detection: the annotation file's category id of class ``name`` (its labels start at 1)."""
        return self.category_ids[self.ids[name] - 1]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Alignment:
    """A split's labels in training's ids, by name. ``index``: split label id -> training label id, for every
    class of the split; ``missing``: training's classes the split does not have (names)."""

    index: dict[int, int]
    missing: tuple[str, ...]

    @property
    def renumbers(self) -> bool:
        """Whether some split id means another class in training (its labels must be mapped)."""
        return any(split_id != trained_id for split_id, trained_id in self.index.items())

    @property
    def trained_ids(self) -> list[int]:
        """The training ids the split has, ascending: the classes its metrics count."""
        return sorted(self.index.values())

    def label_table(self, size: int = IGNORE_INDEX + 1) -> torch.Tensor:
        """(size,) int64: split label id -> training id; any other value (the ignore index) unchanged, so
        ``table[labels]`` maps class labels and segmentation label maps alike."""
        size = max(size, max(self.index, default=-1) + 1)
        table = torch.arange(size, dtype=torch.int64)
        for split_id, trained_id in self.index.items():
            table[split_id] = trained_id
        return table

    def describe(self, split_name: str, trained_name: str) -> str:
        """The one log line of a split that is not numbered exactly as training."""
        mapped = ("its labels are mapped to training's ids by name" if self.renumbers
                  else "its labels are training's ids")
        if not self.missing:
            return f"{split_name} numbers the classes of {trained_name} otherwise: {mapped}"
        return (f"{split_name} holds {len(self.index)} of the {len(self.index) + len(self.missing)} classes of "
                f"{trained_name} (it lacks {short_list(list(self.missing))}): {mapped}, and the metrics count only "
                "its own classes")


def align(trained: ClassMap, split: ClassMap, split_name: str, trained_name: str) -> Alignment:
    """``split``'s labels in ``trained``'s ids, by class name; ``ClassMapError`` names the split's classes that
    training does not have (a renamed folder, another data set)."""
    unknown = [name for name in split.names if name not in trained.ids]
    if unknown:
        raise ClassMapError(f"{split_name} has {len(unknown)} class(es) that {trained_name} was not trained on "
                            f"({short_list(unknown)}; training's: {short_list(trained.names)}): give shards of "
                            "training's classes (make-shards --classes-from TRAIN_SHARDS numbers a split as training)")
    index = {split.ids[name]: trained.ids[name] for name in split.names}
    missing = tuple(name for name in trained.names if name not in split.ids)
    return Alignment(index, missing)


def read_class_list(source: str | Path) -> dict[str, int]:
    """Class name -> id of an existing classification shard directory (its manifest), or of a class-names file
    (one name per line, ids 0..C-1 in line order): what ``make-shards --classes-from`` numbers a split as."""
    from itpn_ds.data.dense_sources import read_class_names

    source = Path(source)
    if source.is_dir():
        manifest = Manifest.load(source)
        if manifest.kind != CLASSIFICATION:
            raise ClassMapError(f"--classes-from {source}: holds {manifest.kind} shards; give classification shards "
                                "or a class-names file")
        return dict(manifest.classes)
    if not source.exists():
        raise ClassMapError(f"--classes-from {source}: no such shard directory or class-names file")
    return {name: i for i, name in enumerate(read_class_names(source))}
