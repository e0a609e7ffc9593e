"""The schema registry: stable ids, backward-compatibility checks that name the field."""
import copy

import pytest

from schemas import IncompatibleSchemaError, SchemaRegistry, UnknownSchemaError, default_registry


def evolve(subject, mutate):
    reg = SchemaRegistry.load()
    raw = copy.deepcopy(reg.latest(subject).raw)
    mutate(raw["fields"])
    return reg, raw


def field(fields, name):
    return next(f for f in fields if f["name"] == name)


def test_ids_are_stable_and_unique():
    reg = default_registry()
    ids = [e.schema_id for e in reg]
    assert len(ids) == len(set(ids)) == 14
    assert reg.by_id(1).subject == "question_answered"
    assert reg.by_id(100).subject == "dead_letter"
    assert reg.by_id(102).subject == "alert"
    assert SchemaRegistry.load().by_id(11).subject == reg.by_id(11).subject == "challenge_completed"
    with pytest.raises(UnknownSchemaError):
        reg.by_id(999)


def test_every_event_schema_parses_and_names_its_topic():
    reg = default_registry()
    topics = {reg.latest(s).topic for s in reg.subjects("event")}
    assert topics == {"learning.events.v1", "content.events.v1", "engagement.events.v1"}


def test_adding_an_optional_field_is_a_new_version():
    reg, raw = evolve("session_started", lambda f: f.append(
        {"name": "referrer", "type": ["null", "string"], "default": None}))
    entry = reg.register("session_started", raw)
    assert entry.version == 2 and entry.schema_id == max(e.schema_id for e in reg) == 103
    assert reg.latest("session_started") is entry
    assert reg.register("session_started", raw) is entry  # same schema: same entry


def test_registering_the_current_schema_changes_nothing():
    reg = SchemaRegistry.load()
    assert reg.register("content_rated", reg.latest("content_rated").raw).version == 1


def test_int_to_long_promotion_is_compatible():
    reg, raw = evolve("content_rated", lambda f: field(f, "rating").update(type="long"))
    assert reg.register("content_rated", raw).version == 2


@pytest.mark.parametrize("mutate,path,reason", [
    (lambda f: f.append({"name": "grade", "type": "int"}), "grade", "added without a default"),
    (lambda f: field(f, "rating").update(type="string"), "rating", "changed type from int to string"),
    (lambda f: field(f, "user_id").update(type="long"), "user_id", "changed type"),
])
def test_incompatible_changes_name_the_field(mutate, path, reason):
    reg, raw = evolve("content_rated", mutate)
    with pytest.raises(IncompatibleSchemaError) as e:
        reg.register("content_rated", raw)
    assert e.value.path == path and reason in str(e.value) and "content_rated" in str(e.value)


def test_dropping_an_enum_symbol_is_refused():
    def drop_sms(fields):
        field(fields, "channel")["type"]["symbols"].remove("SMS")
    reg, raw = evolve("notification_sent", drop_sms)
    with pytest.raises(IncompatibleSchemaError, match="channel.*SMS"):
        reg.register("notification_sent", raw)
