"""`ArgsBase`: the one `config.json` policy of every model configuration dataclass.

Fields are read by name; keys the dataclass does not know are kept in `extra` and written back by
`to_dict`, so a converted model's config.json loses nothing. transformers >= 5 nests the rotary settings
in `rope_parameters` (older configs keep them flat, some write `rope_scaling`): `from_dict` reads all three.
"""

from __future__ import annotations

import inspect


def rope_parameters(theta: float, partial_rotary_factor: float) -> dict:
    """The `rope_parameters` block transformers 5 writes (only the default rope type is supported)."""
    return {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial_rotary_factor}


class ArgsBase:
    """Mixin for config dataclasses that declare an `extra: dict` field last."""

    @classmethod
    def from_dict(cls, config: dict):
        config = dict(config)
        names = inspect.signature(cls).parameters
        if "rope_theta" in names:
            rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
            for key in ("rope_theta", "partial_rotary_factor"):
                if key not in config and key in rope:
                    config[key] = rope[key]
            if rope.get("rope_type", "default") not in ("default", None):
                raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
        known = {k: v for k, v in config.items() if k in names and k != "extra"}
        return cls(**known, extra={k: v for k, v in config.items() if k not in names})

    def fields(self) -> dict:
        """Every declared field but `extra`, by name."""
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters if k != "extra"}

    def to_dict(self) -> dict:
        """The unknown keys of the source, then every field (subclasses add what transformers expects)."""
        return {**self.extra, **self.fields()}
