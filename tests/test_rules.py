"""The CVPR 2022 challenge's rules in the phase configs (issue 34): what they forbade stops a run
in one line naming the rule and its source; ``rules.strict=false`` overrides; Phase I's file name."""

from __future__ import annotations

import pytest

from core.config import ConfigError, load_config
from tests.conftest import ROOT, run_module

PHASES = ["configs/cvpr22_phase1.yaml", "configs/cvpr22_phase2.yaml"]


@pytest.mark.parametrize("config", PHASES)
def test_two_checkpoints_under_a_phase_config_stop_in_one_line(config):
    # launch is what ./run.sh submit runs first: it stops before any process starts
    proc = run_module("launch", "infer.submit", "--config", str(ROOT / config), "submit.checkpoints=[a,b]")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rules.one_model: submit.checkpoints lists 2 models" in lines[0]
    assert "1st-place" in lines[0] and "rules.strict=false" in lines[0]


@pytest.mark.parametrize("config", PHASES)
@pytest.mark.parametrize("key", ["model.pretrained=true", "model.pretrained_file=w.safetensors"])
def test_pretrained_weights_under_a_phase_config_are_refused_with_their_source(config, key):
    with pytest.raises(ConfigError, match=r"rules.no_pretrained: .*ForeverPs/Robust-Classification"):
        load_config(ROOT / config, [key])


def test_rules_strict_false_overrides_and_other_configs_have_no_rules():
    cfg = load_config(ROOT / PHASES[1], ["submit.checkpoints=[a,b]", "model.pretrained=true", "rules.strict=false"])
    assert cfg.submit.checkpoints == ["a", "b"]
    assert load_config(None, ["submit.checkpoints=[a,b]", "model.pretrained=true"]).model.pretrained


def test_phase1_writes_the_file_name_the_public_solutions_wrote():
    cfg = load_config(ROOT / PHASES[0])
    assert cfg.submit.stem(cfg.name).as_posix() == "submissions/t1_p1_result"
