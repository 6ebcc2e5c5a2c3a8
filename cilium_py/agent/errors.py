"""Errors the control plane reports about user input: they name where the input came from,
which object, and which field, so a user can fix it without reading our code."""

from __future__ import annotations


class ValidationError(ValueError):
    def __init__(self, source: str, obj: str, field: str, message: str):
        self.source = source
        self.obj = obj
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.obj, self.field) if p]
        return ": ".join(parts + [self.message])

    def to_dict(self) -> dict:
        return {"source": self.source, "object": self.obj, "field": self.field, "message": self.message}


class InvalidObject(ValidationError):
    """An object rejected for every problem in `errors` (a user sees them all at once); the
    exception itself describes the first. `key` is the object's store key when it could
    be named, so a source can keep the object's previous valid version in effect."""

    def __init__(self, errors: list[ValidationError], key: tuple[str, str, str] | None = None):
        first = errors[0]
        super().__init__(first.source, first.obj, first.field, first.message)
        self.errors = list(errors)
        self.key = key
