"""Which dataset category each of a model's classes is: matched by id and name, never by position alone.

A model trained on one annotation file and scored on another must report its label k under the category
that *is* class k. `match_classes` pairs them:

1. an explicit class map (`--class-map circle=round,square=2`: model class name or id = dataset category
   name or id), when given; model classes it leaves out are not scored, and only the categories it maps to
   are evaluated;
2. otherwise the model's (category id, name) pairs must be the dataset's: matched by id (the order may
   differ); the same names under other ids are matched by name, with a note;
3. a model that stores no class ids or names (an old or foreign checkpoint) is matched by position only when
   the counts agree, and the note says so.

Anything else is a one-line ConfigError listing both sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError


@dataclass(frozen=True)
class ClassMapping:
    cat_ids: list[int | None]  # model label -> dataset category id; None: not scored (its detections dropped)
    scored: list[int]          # the dataset categories COCOeval averages over
    note: str = ""             # how the classes were matched, when it was not an exact match

    def __post_init__(self):
        if not any(c is not None for c in self.cat_ids):
            raise ConfigError("the class map leaves no model class to score")


def match_classes(model_names: Sequence[str], model_ids: Sequence[int], dataset_names: Sequence[str],
                  dataset_ids: Sequence[int], *, class_map: str | dict | None = None, model_source: str = "model",
                  dataset_source: str = "dataset", num_model_classes: int | None = None) -> ClassMapping:
    """Map the model's labels 0..K-1 to the dataset's category ids (see the module docstring)."""
    model_names, model_ids = [str(n) for n in model_names], [int(i) for i in model_ids]
    dataset_names, dataset_ids = [str(n) for n in dataset_names], [int(i) for i in dataset_ids]
    count = num_model_classes if num_model_classes is not None else max(len(model_names), len(model_ids))
    if class_map:
        return _explicit(_read_class_map(class_map), model_names, model_ids, count, dataset_names, dataset_ids)
    if model_ids and len(model_ids) == count:
        if set(model_ids) == set(dataset_ids):
            dataset_name_of = dict(zip(dataset_ids, dataset_names))
            if not model_names or all(dataset_name_of[i] == n for i, n in zip(model_ids, model_names)):
                return ClassMapping(list(model_ids), list(dataset_ids))
    if model_names and len(model_names) == count and len(set(model_names)) == len(model_names) \
            and sorted(model_names) == sorted(dataset_names) and len(set(dataset_names)) == len(dataset_names):
        id_of = dict(zip(dataset_names, dataset_ids))
        cat_ids = [id_of[name] for name in model_names]
        note = "" if cat_ids == model_ids else f"the {model_source}'s class ids differ from the {dataset_source}'s: matched by name"
        return ClassMapping(cat_ids, list(dataset_ids), note)
    if not model_names and not model_ids:
        if count == len(dataset_ids):
            return ClassMapping(list(dataset_ids), list(dataset_ids),
                                f"the {model_source} stores no class names or ids: its {count} classes are taken "
                                f"to be the {dataset_source}'s categories in id order ({_listing(dataset_ids, dataset_names)})")
        raise ConfigError(f"the {model_source} has {count} classes (no names or ids stored) but the {dataset_source} "
                          f"has {len(dataset_ids)} categories; pass --class-map to say how they relate")
    raise ConfigError(f"the {model_source}'s classes do not correspond to the {dataset_source}'s categories: "
                      f"{model_source} [{_listing(model_ids, model_names)}] vs {dataset_source} "
                      f"[{_listing(dataset_ids, dataset_names)}]; pass --class-map MODEL_CLASS=DATASET_CATEGORY,... "
                      "to say how they relate")


def _explicit(pairs: dict, model_names, model_ids, count, dataset_names, dataset_ids) -> ClassMapping:
    cat_ids: list[int | None] = [None] * count
    for key, value in pairs.items():
        label = _resolve(key, model_names, model_ids or list(range(count)), "model class",
                         _listing(model_ids, model_names) if (model_ids or model_names) else f"labels 0..{count - 1}")
        category = _resolve(value, dataset_names, dataset_ids, "dataset category", _listing(dataset_ids, dataset_names))
        cat_ids[label] = dataset_ids[category]
    scored = sorted({c for c in cat_ids if c is not None})
    label_names = model_names or [str(label) for label in range(count)]
    left_out = [label_names[label] for label, cat_id in enumerate(cat_ids) if cat_id is None]
    note = f"--class-map: scoring {len(scored)} of the dataset's {len(dataset_ids)} categories"
    if left_out:
        note += f"; model classes not scored: {', '.join(map(str, left_out))}"
    return ClassMapping(cat_ids, scored, note)


def _resolve(key, names: list[str], ids: list[int], what: str, listing: str) -> int:
    """The index of `key` (a name, or an id written as a number) among `names`/`ids`."""
    text = str(key).strip()
    if text in names:
        return names.index(text)
    if text.lstrip("-").isdigit() and int(text) in ids:
        return ids.index(int(text))
    raise ConfigError(f"--class-map: '{text}' is not a {what} (valid: {listing})")


def _read_class_map(class_map: str | dict) -> dict:
    """A dict, a JSON/YAML file of {model: dataset}, or 'a=b,c=d'."""
    if isinstance(class_map, dict):
        return class_map
    path = Path(class_map)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--class-map: {path}: no such file")
        import yaml  # also reads JSON

        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"--class-map: {path}: expected a mapping of model class to dataset category")
        return data
    pairs = {}
    for item in filter(None, (part.strip() for part in class_map.split(","))):
        if "=" not in item:
            raise ConfigError(f"--class-map: '{item}' is not MODEL_CLASS=DATASET_CATEGORY")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def _listing(ids: Sequence[int], names: Sequence[str]) -> str:
    if ids and names:
        items = [f"{i} {n}" for i, n in zip(ids, names)]
    else:
        items = [str(x) for x in (ids or names)]
    return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

