"""The public API: every name in ``align_kd.__all__`` exists and ``__all__`` is sorted."""
import importlib

import torch

torch.set_num_threads(1)

import align_kd  # noqa: E402


def test_all_names_import():
    assert len(align_kd.__all__) > 0
    assert len(set(align_kd.__all__)) == len(align_kd.__all__)
    for name in align_kd.__all__:
        assert getattr(align_kd, name, None) is not None, name
    namespace = {}
    exec(f"from align_kd import {', '.join(align_kd.__all__)}", namespace)
    assert set(align_kd.__all__) <= set(namespace)
    star = {}
    exec("from align_kd import *", star)
    assert set(align_kd.__all__) <= set(star)


def test_all_is_sorted():
    assert list(align_kd.__all__) == sorted(align_kd.__all__)


def test_core_verbs_are_public():
    for name in ("fit", "FitResult", "FitConfig", "discover_layers", "describe_layers", "FeatureTap", "sinkhorn", "MIBank"):
        assert name in align_kd.__all__, name
    assert callable(align_kd.fit) and callable(align_kd.discover_layers) and callable(align_kd.sinkhorn)


def test_submodule_all_names_exist():
    for mod in ("taps", "mi", "plans", "training", "losses", "zoo", "experiment"):
        module = importlib.import_module(f"align_kd.{mod}")
        for name in module.__all__:
            assert hasattr(module, name), f"align_kd.{mod}.{name}"
