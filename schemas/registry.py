"""The schema registry: stable ids and versions for every Avro schema of the project.

Schemas live as files, ``schemas/avro/<subject>/v<version>.avsc``, and
``schemas/registry.json`` gives each (subject, version) its id. Because both are
committed, an id means the same schema on every machine and after every restart:
that is what the Confluent wire framing (magic byte 0, then a 4-byte big-endian
schema id) relies on.

A subject is one kind of record, e.g. ``question_answered``. Its newest version
is the *reader* schema: records written with any older version are resolved to
it (fastavro does the Avro schema resolution). A new version is accepted only if
it is backward compatible, i.e. it can read everything the previous version
wrote; otherwise :class:`IncompatibleSchemaError` names the offending field.

    registry = SchemaRegistry.load()
    entry = registry.by_id(1)               # -> RegisteredSchema
    reader = registry.latest("question_answered")
    registry.register("question_answered", new_schema_dict, save=True)
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import fastavro

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
REGISTRY_FILE = os.path.join(SCHEMA_DIR, "registry.json")

_PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "double": {"double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
    "boolean": {"boolean"},
    "null": {"null"},
}


class IncompatibleSchemaError(ValueError):
    """A new schema version cannot read what the previous version wrote."""

    def __init__(self, subject: str, path: str, reason: str):
        self.subject, self.path, self.reason = subject, path, reason
        super().__init__(
            f"schema for '{subject}' is not backward compatible: field '{path}' {reason}")


class UnknownSchemaError(KeyError):
    """No schema is registered under that id or subject."""


@dataclass(frozen=True)
class RegisteredSchema:
    """One version of one subject: its id, its raw JSON and its parsed form."""
    subject: str
    version: int
    schema_id: int
    topic: str
    kind: str  # "event" for the events the pipelines read, "envelope" for their outputs
    raw: dict = field(repr=False, hash=False, compare=False)
    parsed: Any = field(repr=False, hash=False, compare=False)


def _parse(raw: dict) -> Any:
    # parse_schema mutates nothing, but it caches named types per call; a fresh
    # dict per subject keeps the same enum name in two files from clashing.
    return fastavro.parse_schema(copy.deepcopy(raw), named_schemas={})


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, list):
        return "union"
    return schema["type"] if isinstance(schema["type"], str) else _type_name(schema["type"])


def _check_type(subject: str, path: str, writer: Any, reader: Any) -> None:
    """Raises unless data written as ``writer`` can be read as ``reader``."""
    if isinstance(writer, list):
        for branch in writer:
            _check_type(subject, path, branch, reader)
        return
    if isinstance(reader, list):
        for branch in reader:
            try:
                _check_type(subject, path, writer, branch)
                return
            except IncompatibleSchemaError:
                continue
        raise IncompatibleSchemaError(
            subject, path, f"of type {_type_name(writer)} matches no branch of the new union")
    w, r = _type_name(writer), _type_name(reader)
    if w in _PROMOTIONS:
        if r not in _PROMOTIONS[w]:
            raise IncompatibleSchemaError(subject, path, f"changed type from {w} to {r}")
        return
    if w != r:
        raise IncompatibleSchemaError(subject, path, f"changed type from {w} to {r}")
    if w == "record":
        _check_record(subject, path, writer, reader)
    elif w == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        if missing and "default" not in reader:
            raise IncompatibleSchemaError(
                subject, path, f"dropped enum symbols {sorted(missing)} without a default symbol")
    elif w == "array":
        _check_type(subject, path + "[]", writer["items"], reader["items"])
    elif w == "map":
        _check_type(subject, path + "{}", writer["values"], reader["values"])
    elif w == "fixed" and writer["size"] != reader["size"]:
        raise IncompatibleSchemaError(subject, path, "changed fixed size")


def _check_record(subject: str, prefix: str, writer: dict, reader: dict) -> None:
    written = {f["name"]: f for f in writer["fields"]}
    for f in reader["fields"]:
        path = f"{prefix}.{f['name']}" if prefix else f["name"]
        source = written.get(f["name"]) or next(
            (written[a] for a in f.get("aliases", []) if a in written), None)
        if source is None:
            if "default" not in f:
                raise IncompatibleSchemaError(subject, path, "was added without a default")
            continue
        _check_type(subject, path, source["type"], f["type"])


def check_backward_compatible(subject: str, old: dict, new: dict) -> None:
    """Raises IncompatibleSchemaError unless ``new`` can read data written with ``old``."""
    _check_record(subject, "", old, new)


class SchemaRegistry:
    """All registered schemas, by id and by subject; see the module docstring."""

    def __init__(self, entries: list[RegisteredSchema], path: str = REGISTRY_FILE):
        self._path = path
        self._by_id = {e.schema_id: e for e in entries}
        self._by_subject: dict[str, list[RegisteredSchema]] = {}
        for e in sorted(entries, key=lambda e: e.version):
            self._by_subject.setdefault(e.subject, []).append(e)

    @classmethod
    def load(cls, path: str = REGISTRY_FILE) -> "SchemaRegistry":
        with open(path) as f:
            subjects = json.load(f)["subjects"]
        base = os.path.join(os.path.dirname(path), "avro")
        entries = []
        for subject, spec in subjects.items():
            for v in spec["versions"]:
                with open(os.path.join(base, subject, f"v{v['version']}.avsc")) as f:
                    raw = json.load(f)
                entries.append(RegisteredSchema(
                    subject, v["version"], v["id"], spec["topic"], spec.get("kind", "event"), raw, _parse(raw)))
        return cls(entries, path)

    def by_id(self, schema_id: int) -> RegisteredSchema:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise UnknownSchemaError(schema_id) from None

    def latest(self, subject: str) -> RegisteredSchema:
        try:
            return self._by_subject[subject][-1]
        except KeyError:
            raise UnknownSchemaError(subject) from None

    def subjects(self, kind: str | None = None) -> list[str]:
        """Subject names; ``kind='event'`` gives the event types only."""
        return [s for s, versions in self._by_subject.items() if kind is None or versions[-1].kind == kind]

    def __iter__(self) -> Iterator[RegisteredSchema]:
        return iter(self._by_id.values())

    def register(self, subject: str, schema: dict, save: bool = False) -> RegisteredSchema:
        """Adds ``schema`` as the next version of ``subject``; refuses incompatible ones.

        An identical schema returns the existing entry. With ``save`` the .avsc
        file and registry.json are written, which is how a new version lands.
        """
        current = self.latest(subject)
        if _parse(schema) == current.parsed:
            return current
        check_backward_compatible(subject, current.raw, schema)
        entry = RegisteredSchema(
            subject, current.version + 1, max(self._by_id) + 1, current.topic, current.kind,
            schema, _parse(schema))
        self._by_id[entry.schema_id] = entry
        self._by_subject[subject].append(entry)
        if save:
            self._save(entry)
        return entry

    def _save(self, entry: RegisteredSchema) -> None:
        folder = os.path.join(os.path.dirname(self._path), "avro", entry.subject)
        with open(os.path.join(folder, f"v{entry.version}.avsc"), "w") as f:
            json.dump(entry.raw, f, indent=2)
            f.write("\n")
        with open(self._path) as f:
            doc = json.load(f)
        doc["subjects"][entry.subject]["versions"].append(
            {"version": entry.version, "id": entry.schema_id})
        with open(self._path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


_DEFAULT: SchemaRegistry | None = None


def default_registry() -> SchemaRegistry:
    """The registry of this checkout, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SchemaRegistry.load()
    return _DEFAULT
