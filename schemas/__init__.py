"""Avro schemas of the project, their registry, and the wire framing."""
from schemas.registry import (IncompatibleSchemaError, RegisteredSchema, SchemaRegistry,
                              UnknownSchemaError, check_backward_compatible, default_registry)

__all__ = ["IncompatibleSchemaError", "RegisteredSchema", "SchemaRegistry", "UnknownSchemaError",
           "check_backward_compatible", "default_registry"]
