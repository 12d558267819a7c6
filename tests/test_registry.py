import pytest

from videollm.errors import RegistryError
from videollm.registry import Registry, registry


def test_duplicate_name_fails_and_unknown_lists_names():
    @registry.register_processor("_test_proc_a")
    class A:  # noqa: D401
        pass

    # re-registering the same class is idempotent (module re-import), another class fails
    registry.register_processor("_test_proc_a")(A)
    with pytest.raises(RegistryError, match="already registered"):

        @registry.register_processor("_test_proc_a")
        class B:
            pass

    assert registry.get_processor_class("_test_proc_a") is A
    with pytest.raises(RegistryError, match=r"unknown processor '_test_proc_b'.*did you mean _test_proc_a\?.*registered processors: .*_test_proc_a"):
        registry.get_processor_class("_test_proc_b")
    del Registry.mapping["processor"]["_test_proc_a"]


def test_kinds_have_their_parts():
    assert "video_llama" in registry.list("model")
    for kind in ("model", "processor", "builder", "task", "runner", "lr_scheduler"):
        assert isinstance(registry.list(kind), list)
