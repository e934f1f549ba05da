from pathlib import Path

import pytest
import yaml

from edgekd import EdgekdError, load_profile
from edgekd.cli import main
from edgekd.pipeline.plan import plan_stages
from edgekd.profiles import builtin_profile_names

REQUIRED = {"phone", "raspberry-pi-5", "raspberry-pi-4", "laptop"}


def write_profile(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(Path("profiles/raspberry-pi-5.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_required_profiles_ship():
    assert REQUIRED <= set(builtin_profile_names())


@pytest.mark.parametrize("name", builtin_profile_names())
def test_every_builtin_profile_loads_and_plans(name):
    prof = load_profile(name)
    assert prof.name == name
    assert prof.hardware.memory_bandwidth_gbs > 0 and prof.hardware.peak_gflops_fp32 > 0
    assert prof.hardware.power_idle_w < prof.hardware.power_active_w
    stages = plan_stages(prof)
    assert stages[0] == "load_teacher" and "evaluate_teacher" in stages


def test_a_teacher_cache_is_built_only_for_steps_that_read_it():
    """The shipped profiles ask for a hidden-state cache (the teacher's final hidden states). It spares
    the teacher's pass only in a logit-only step; with the profiles' loss terms every step runs the
    teacher for hidden-state targets, so no cache is planned, and turning QAT's hidden-state term off
    brings it back, for QAT alone. A logit cache stands in for the teacher's logits whatever the terms."""
    from edgekd.methods.distill import DistillConfig
    from edgekd.methods.step_losses import reads_teacher_cache
    from edgekd.stages.distill import cache_readers

    prof = load_profile("raspberry-pi-5")
    assert prof.compression.distill.logit_cache.kind == "hidden"
    assert cache_readers(prof) == {} and "teacher_logits" not in plan_stages(prof)
    logit_only_qat = load_profile("raspberry-pi-5", ["compression.qat.losses={logit_kl: 1.0}"])
    assert cache_readers(logit_only_qat) == {"qat": prof.compression.qat.steps}
    assert plan_stages(logit_only_qat).index("teacher_logits") < plan_stages(logit_only_qat).index("qat")
    sampled = load_profile("raspberry-pi-5", ["compression.distill.logit_cache={kind: sample, k: 8}"])
    assert cache_readers(sampled) == {"distill": prof.compression.distill.steps, "qat": prof.compression.qat.steps}
    cfg = DistillConfig.from_settings(prof.compression.distill)
    assert not reads_teacher_cache(cfg, "hidden") and reads_teacher_cache(cfg, "topk")
    cfg.w_hidden = cfg.w_attention = 0.0
    assert reads_teacher_cache(cfg, "hidden")
    cfg.alpha = 0.0  # cross-entropy alone: no teacher targets at all
    assert not reads_teacher_cache(cfg, "hidden") and not reads_teacher_cache(cfg, "sample")


@pytest.mark.parametrize("name", ["phone", "laptop"])
def test_battery_devices_have_battery(name):
    assert load_profile(name).hardware.battery_wh > 0


def test_every_hardware_figure_has_a_source_comment():
    for path in Path("profiles").glob("*.yaml"):
        in_hardware = False
        for line in path.read_text().splitlines():
            if line.startswith("hardware:"):
                in_hardware = True
                continue
            if in_hardware and not line.startswith("  "):
                break
            if in_hardware and "battery_wh: null" not in line:
                assert "#" in line, f"{path.name}: no source comment on {line.strip()!r}"


def test_override_sets_typed_value():
    prof = load_profile("laptop", ["deployment.threads=2", "budgets.max_model_mb=150.5", "deployment.formats=[gguf, onnx]"])
    assert prof.deployment.threads == 2
    assert prof.budgets.max_model_mb == 150.5
    assert prof.deployment.formats == ["gguf", "onnx"]


def test_override_dict_form():
    assert load_profile("phone", {"deployment.threads": 1}).deployment.threads == 1


def test_unknown_profile_name_suggests_closest():
    with pytest.raises(EdgekdError) as exc:
        load_profile("rasberry-pi-5")
    assert "unknown profile 'rasberry-pi-5'" in str(exc.value)
    assert "did you mean 'raspberry-pi-5'" in str(exc.value)


def test_missing_profile_file():
    with pytest.raises(EdgekdError, match="profile file not found"):
        load_profile("no/such/profile.yaml")


def test_all_problems_reported_at_once_with_paths_and_suggestions(tmp_path):
    path = write_profile(
        tmp_path, hardware__cores="four", hardware__power_idle_w=9.0, deployment__weight_format="q3",
        deployment__formats=["onnx"],
    )
    data = yaml.safe_load(path.read_text())
    data["hardware"]["memory_bandwith_gbs"] = data["hardware"].pop("memory_bandwidth_gbs")
    data["budgetz"] = {}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgekdError) as exc:
        load_profile(path)
    text = str(exc.value)
    assert "has 7 problems" in text
    assert "hardware.cores: Input should be a valid integer" in text and "'four'" in text
    assert "hardware.memory_bandwith_gbs: unknown key; did you mean 'memory_bandwidth_gbs'?" in text
    assert "hardware.memory_bandwidth_gbs: required key is missing" in text
    assert "deployment.weight_format" in text and "'q3'" in text
    assert "budgetz: unknown key; did you mean 'budgets'?" in text
    assert "power_idle_w (9.0) must be lower than power_active_w" in text
    assert "runtime 'llama.cpp' loads 'gguf' files" in text


def test_bad_override_key_is_named():
    with pytest.raises(EdgekdError) as exc:
        load_profile("laptop", ["deployment.thread=2"])
    assert "deployment.thread: unknown key; did you mean 'threads'?" in str(exc.value)
    assert "--set" in str(exc.value)


def test_malformed_override():
    with pytest.raises(EdgekdError, match="expected KEY.PATH=VALUE"):
        load_profile("laptop", ["deployment.threads"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nhardware:\n  cores: [4\n")
    with pytest.raises(EdgekdError) as exc:
        load_profile(path)
    assert "is not valid YAML at line" in str(exc.value)


def test_profile_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(EdgekdError, match="must be a YAML mapping"):
        load_profile(path)


def test_cli_profiles_check_exit_codes(tmp_path, capsys):
    good = write_profile(tmp_path)
    assert main(["profiles", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    assert main(["profiles", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "description: required key is missing" in err and "Traceback" not in err


def test_cli_profiles_show_is_valid_yaml_with_overrides(capsys, tmp_path):
    assert main(["profiles", "show", "raspberry-pi-5", "--set", "deployment.threads=2"]) == 0
    shown = capsys.readouterr().out
    path = tmp_path / "shown.yaml"
    path.write_text(shown)
    assert load_profile(path).deployment.threads == 2


def test_keys_renamed_in_schema_2_name_their_new_place():
    with pytest.raises(EdgekdError) as exc:
        load_profile("raspberry-pi-5", ["compression.distill.seq_len=64", "compression.distill.logit_cache_top_k=8",
                                        "compression.distill.logit_cache_kind=topk"])
    text = exc.value.render()
    assert "3 problems" in text
    assert "compression.distill.seq_len: renamed to compression.data.block_len" in text
    assert "compression.distill.logit_cache_top_k: renamed to compression.distill.logit_cache.k" in text
    assert "compression.distill.logit_cache_kind: renamed to compression.distill.logit_cache.kind" in text
    prof = load_profile("raspberry-pi-5", ["compression.data.block_len=64", "compression.distill.logit_cache.k=8",
                                            "compression.distill.logit_cache.kind=sample"])
    assert prof.compression.data.block_len == 64 and prof.compression.distill.logit_cache.kind == "sample"


def test_weight_format_choices_come_from_the_registry():
    from edgekd.formats import LINEAR_FORMATS

    for name in LINEAR_FORMATS:
        assert load_profile("raspberry-pi-5", [f"deployment.weight_format={name}"]).deployment.weight_format == name
    with pytest.raises(EdgekdError, match="deployment.weight_format"):
        load_profile("raspberry-pi-5", ["deployment.weight_format=f32"])  # a norm format, not a profile choice
