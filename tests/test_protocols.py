"""Named protocols: every shipped protocol config resolves to its protocol, the defaults are the references',
and a record names the protocol that made it (evaluate/protocols.py)."""
from __future__ import annotations

import dataclasses

import pytest

from mocobench.core.config import parse_config, to_dict
from mocobench.evaluate import knn, linear, lowshot, semisup, svm
from mocobench.evaluate.protocols import protocol_of
from mocobench.evaluate.registry import EVALUATORS

MODULES = {"svm": (svm, svm.SVMConfig, "voc07-svm"), "lowshot": (lowshot, lowshot.LowShotConfig, "lowshot"),
           "linear": (linear, linear.LinearConfig, "linear"), "knn": (knn, knn.KNNConfig, "knn"),
           "semisup": (semisup, semisup.SemisupConfig, "semisup")}


def resolved(name: str, cfg):
    return to_dict(linear.resolve_protocol(cfg) if name == "linear" else cfg)


@pytest.mark.parametrize("name", list(MODULES))
def test_every_shipped_protocol_config_is_its_protocol(name):
    module, cls, family = MODULES[name]
    shipped = 0
    for p in module.NAMED_PROTOCOLS:
        yaml_name = p.name.split("/", 1)[1]
        if not (EVALUATORS[name].config_dir / f"{yaml_name}.yaml").is_file():
            assert p.name == "linear/fast-proxy"  # the only protocol without a preset of its own
            continue
        cfg, _ = parse_config(cls, ["--config", yaml_name], "t", "t", search_dir=EVALUATORS[name].config_dir)
        assert protocol_of(resolved(name, cfg), module.NAMED_PROTOCOLS, family) == p.label
        shipped += 1
    assert shipped >= 1


@pytest.mark.parametrize("name, want", [("svm", "voc07-svm/vissl@1"), ("lowshot", "lowshot/vissl@1"),
                                        ("linear", "linear/moco@1"), ("knn", "knn/mmselfsup@1"),
                                        ("semisup", "semisup/mmselfsup@1")])
def test_defaults_are_the_reference_protocols_and_changes_are_custom(name, want):
    module, cls, family = MODULES[name]
    cfg = cls()
    assert protocol_of(resolved(name, cfg), module.NAMED_PROTOCOLS, family) == want
    changed = {"svm": {"costs": [1.0, 10.0]}, "lowshot": {"samples": 3}, "linear": {"lr": 0.5},
               "knn": {"ks": [20]}, "semisup": {"epochs": 5}}[name]
    cfg = dataclasses.replace(cfg, **changed)
    assert protocol_of(resolved(name, cfg), module.NAMED_PROTOCOLS, family) == f"{family}/custom"


def test_mmselfsup_svm_costs_are_its_own_protocol():
    cfg = dataclasses.replace(svm.SVMConfig(), costs=[1, 10, 100])
    assert protocol_of(to_dict(cfg), svm.NAMED_PROTOCOLS, "voc07-svm") == "voc07-svm/mmselfsup@1"
