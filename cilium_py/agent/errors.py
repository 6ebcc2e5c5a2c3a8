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
