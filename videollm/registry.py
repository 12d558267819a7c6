"""A LAVIS-style registry: configs name parts, the registry maps names to classes.

Kinds: ``model``, ``processor``, ``builder`` (dataset builders), ``task``, ``runner``,
``lr_scheduler``. Registering a name twice fails; asking for an unknown name fails with
the list of registered names. Registration is a side effect of importing the module
that defines the class; :func:`import_all` imports every part of the package.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

from videollm.errors import RegistryError, closest

KINDS = ("model", "processor", "builder", "task", "runner", "lr_scheduler", "scorer")

# Modules whose import registers parts; extended as the package grows.
_PART_MODULES = (
    "videollm.models",
    "videollm.processors",
    "videollm.datasets",
    "videollm.tasks",
    "videollm.runners",
    "videollm.evaluation",
)


class Registry:
    """Class-level name -> class maps, one per kind."""

    mapping: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}

    @classmethod
    def _register(cls, kind: str, name: str) -> Callable[[Any], Any]:
        def wrap(obj: Any) -> Any:
            table = cls.mapping[kind]
            if name in table and table[name] is not obj:
                raise RegistryError(
                    f"{kind} name '{name}' is already registered to {table[name].__module__}."
                    f"{table[name].__name__}; choose another name for {obj.__module__}.{obj.__name__}"
                )
            table[name] = obj
            return obj

        return wrap

    @classmethod
    def _get(cls, kind: str, name: str) -> Any:
        import_all()
        table = cls.mapping[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "(none)"
            raise RegistryError(
                f"unknown {kind} '{name}'{closest(name, table)}; registered {kind}s: {known}"
            )
        return table[name]

    # Registration decorators -------------------------------------------------------
    @classmethod
    def register_model(cls, name: str):
        return cls._register("model", name)

    @classmethod
    def register_processor(cls, name: str):
        return cls._register("processor", name)

    @classmethod
    def register_builder(cls, name: str):
        return cls._register("builder", name)

    @classmethod
    def register_task(cls, name: str):
        return cls._register("task", name)

    @classmethod
    def register_runner(cls, name: str):
        return cls._register("runner", name)

    @classmethod
    def register_lr_scheduler(cls, name: str):
        return cls._register("lr_scheduler", name)

    # Look-ups ------------------------------------------------------------------------
    @classmethod
    def register_scorer(cls, name: str):
        """A scorer: ``fn(predictions, references) -> {metric: value}`` (evaluation by tasks)."""
        return cls._register("scorer", name)

    @classmethod
    def get_scorer(cls, name: str):
        return cls._get("scorer", name)

    @classmethod
    def get_model_class(cls, name: str):
        return cls._get("model", name)

    @classmethod
    def get_processor_class(cls, name: str):
        return cls._get("processor", name)

    @classmethod
    def get_builder_class(cls, name: str):
        return cls._get("builder", name)

    @classmethod
    def get_task_class(cls, name: str):
        return cls._get("task", name)

    @classmethod
    def get_runner_class(cls, name: str):
        return cls._get("runner", name)

    @classmethod
    def get_lr_scheduler_class(cls, name: str):
        return cls._get("lr_scheduler", name)

    @classmethod
    def list(cls, kind: str):
        import_all()
        return sorted(cls.mapping[kind])


registry = Registry

_imported = False


def import_all() -> None:
    """Import every module that registers parts (idempotent)."""
    global _imported
    if _imported:
        return
    _imported = True
    for mod in _PART_MODULES:
        importlib.import_module(mod)
