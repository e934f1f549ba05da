"""Measured knob costs: each format, block and width alone, as KL to the teacher; the model is left unchanged."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_llama

    model = make_tiny_llama(128, layers=3, hidden=64, intermediate=128, seed=1)
    with torch.no_grad():  # initialisation-sized weights barely move the logits: make every tensor matter
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def test_costs_order_as_the_formats_do_and_the_model_is_untouched(tiny):
    from edgekd.methods.sensitivity import measure_sensitivity, measurements, predicted_format_kl

    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    blocks = np.random.default_rng(0).integers(0, 128, size=(4, 32))
    seen = []
    s = measure_sensitivity(tiny, blocks, ["q4_0", "q5_0", "q8_0"], (0.5,), progress=seen.append)
    assert len(seen) == measurements(tiny, ["q4_0", "q5_0", "q8_0"], (0.5,)) == 8 * 3 + 3 + 1
    assert s.tokens == 4 * 31 and set(s.formats) == {"embedding", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    for group, costs in s.formats.items():
        assert 0 <= costs["q8_0"] < costs["q5_0"] < costs["q4_0"], group  # fewer bits, more damage
    assert len(s.blocks) == 3 and all(kl > 0 for kl in s.blocks) and s.mlp_width["0.5"] > 0
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    from edgekd.formats import FormatPlan

    all4 = predicted_format_kl(s, FormatPlan.uniform("q4_0", {"embedding": "q4_0"}), tuple(r for r in s.formats if r != "embedding"))
    assert all4 == pytest.approx(sum(c["q4_0"] for c in s.formats.values()))


def test_the_kl_meter_matches_full_logits_and_width_pruning_matches_a_pruned_copy(tiny):
    """The chunked meter against the plain KL on full log-probabilities, and the in-place width
    pruning against a pruned deep copy; the model comes back with its own modules."""
    import copy

    from edgekd.methods.prune import apply_mlp_channels, mlp_channel_importance, select_mlp_channels
    from edgekd.methods.sensitivity import _KLMeter, mlp_width_applied

    blocks = np.random.default_rng(1).integers(0, 128, size=(3, 32))
    meter = _KLMeter(tiny, blocks, batch_size=2)
    channels = select_mlp_channels(mlp_channel_importance(tiny, blocks), 0.5)
    pruned = copy.deepcopy(tiny)
    apply_mlp_channels(pruned, channels)
    ids = torch.from_numpy(blocks.astype(np.int64))
    with torch.no_grad():
        t = torch.log_softmax(tiny(input_ids=ids).logits[:, :-1].float(), -1)
        s = torch.log_softmax(pruned(input_ids=ids).logits[:, :-1].float(), -1)
    want = float((t.exp() * (t - s)).sum() / (3 * 31))
    modules = [m for m in tiny.modules()]
    with mlp_width_applied(tiny, channels):
        assert tiny.config.intermediate_size == 64
        assert meter.kl(tiny) == pytest.approx(want, rel=1e-4)
    assert [m for m in tiny.modules()] == modules and tiny.config.intermediate_size == 128
    assert meter.kl(tiny) == pytest.approx(0.0, abs=1e-6)


def test_kept_teacher_logprobs_give_the_same_costs_bit_for_bit(tiny, monkeypatch):
    """Holding the teacher's log-probabilities (one head a measurement) changes no number, and the
    prediction counts what they hold."""
    from edgekd.methods.sensitivity import (
        measure_sensitivity,
        predict_sensitivity_peak,
        teacher_logprob_bytes,
    )

    blocks = np.random.default_rng(2).integers(0, 128, size=(3, 32))
    plain = measure_sensitivity(tiny, blocks, ["q4_0", "q8_0"], (0.5,))
    kept = measure_sensitivity(tiny, blocks, ["q4_0", "q8_0"], (0.5,), keep_teacher_logprobs=True)
    assert (kept.formats, kept.blocks, kept.mlp_width) == (plain.formats, plain.blocks, plain.mlp_width)
    assert teacher_logprob_bytes(tiny, blocks) == 3 * 31 * 128 * 4
    monkeypatch.setattr("edgekd.methods.memory._resident_now", lambda: 1e9)  # the same process both times
    extra = predict_sensitivity_peak(tiny, blocks, keep_teacher_logprobs=True) - predict_sensitivity_peak(tiny, blocks)
    assert extra == teacher_logprob_bytes(tiny, blocks)


def test_weights_already_on_a_formats_grid_cost_nothing_and_run_no_forward_pass(tiny):
    """A GGUF teacher stored in a candidate format (the default teacher's linears are Q4_1) is
    unchanged by that format's round trip: KL 0 recorded without a pass; other formats still measured."""
    import copy

    from edgekd.formats import FORMATS
    from edgekd.methods.sensitivity import measure_sensitivity

    gridded = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, p in gridded.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(FORMATS["q4_0"].torch_round_trip(p))
    passes = []
    gridded.register_forward_hook(lambda *_: passes.append(1))
    blocks = np.random.default_rng(3).integers(0, 128, size=(2, 32))
    s = measure_sensitivity(gridded, blocks, ["q4_0", "q8_0"])
    linear_roles = [g for g in s.formats if g != "embedding"]
    assert all(s.formats[g]["q4_0"] == 0.0 and s.formats[g]["q8_0"] > 0 for g in linear_roles)
    assert s.formats["embedding"]["q4_0"] > 0
    # the teacher's reference pass, one per measured format (embedding x2, each role's q8_0), one per skipped block
    assert len(passes) == 1 + 2 + len(linear_roles) + 3


def test_a_time_share_measures_on_as_many_batches_as_fit(tiny, monkeypatch):
    """With ``seconds``, the measurements are made a batch of 4 blocks at a time, and another batch only
    while the last one's measured time still fits in what is left: never fewer than one batch, and the
    costs bit for bit those of every batch measured at once."""
    from edgekd.methods import sensitivity as sens

    blocks = np.random.default_rng(4).integers(0, 128, size=(8, 32))
    formats = ["q4_0", "q8_0"]
    short = sens.measure_sensitivity(tiny, blocks, formats, (0.5,), seconds=1e-6)
    assert (short.calibration_blocks, short.tokens, len(short.batch_seconds)) == (4, 4 * 31, 1)
    whole = sens.measure_sensitivity(tiny, blocks, formats, (0.5,), seconds=1e6)
    assert (whole.calibration_blocks, whole.tokens, len(whole.batch_seconds)) == (8, 8 * 31, 2)
    plain = sens.measure_sensitivity(tiny, blocks, formats, (0.5,))
    assert (plain.formats, plain.blocks, plain.mlp_width) == (whole.formats, whole.blocks, whole.mlp_width)
    assert plain.batch_seconds is None and sens.measurements(tiny, formats) == 8 * 2 + 3

    # a clock on which a batch of measurements takes 10 s and nothing else takes any time
    clock = [0.0]
    measure = sens._kl_sums

    def ten_seconds(*args, **kwargs):
        clock[0] += 10.0
        return measure(*args, **kwargs)

    monkeypatch.setattr(sens, "_now", lambda: clock[0])
    monkeypatch.setattr(sens, "_kl_sums", ten_seconds)
    twelve = np.random.default_rng(5).integers(0, 128, size=(12, 32))  # three batches
    for seconds, used in ((19.9, 4), (20.0, 8), (29.9, 8), (30.0, 12), (1e6, 12)):
        s = sens.measure_sensitivity(tiny, twelve, formats, seconds=seconds)
        assert (s.calibration_blocks, s.batch_seconds) == (used, [10.0] * (used // 4)), seconds


def test_a_sensitivity_record_of_an_earlier_version_still_loads():
    """A run directory's ``plan/sensitivity.json`` written before a field was dropped resumes."""
    from edgekd.methods.sensitivity import Sensitivity

    old = {"tokens": 124, "formats": {"embedding": {"q4_0": 0.1}}, "blocks": [0.5], "mlp_width": {}, "seconds": 3.0,
           "calibration_blocks": 4, "round_trips_s": 1.5}
    assert Sensitivity.from_dict(old) == Sensitivity(124, {"embedding": {"q4_0": 0.1}}, [0.5], {}, 3.0, 4)


def test_skipped_blocks_replay_the_teachers_earlier_blocks_and_cost_the_same(tiny):
    """A block skipped is measured from the teacher's own outputs of the blocks before it: only the
    blocks after it are computed, and every cost equals the full pass with the block skipped."""
    from conftest import skip_costs_by_full_passes

    from edgekd.methods.prune import decoder_layers
    from edgekd.methods.sensitivity import measure_sensitivity

    blocks = np.random.default_rng(5).integers(0, 128, size=(6, 32))  # two batches, the second short
    full = skip_costs_by_full_passes(tiny, blocks)
    computed = []
    handles = [layer.self_attn.register_forward_hook(lambda *_: computed.append(1)) for layer in decoder_layers(tiny)]
    try:
        s = measure_sensitivity(tiny, blocks, [])
    finally:
        for h in handles:
            h.remove()
    assert s.blocks == full
    # per batch: the teacher's pass (3 blocks), block 0 skipped (3: computed, then passed over), 1 (block 2), 2 (none)
    assert len(computed) == 2 * (3 + 3 + 1 + 0)
    assert all(kl > 0 for kl in s.blocks) and "forward" not in vars(decoder_layers(tiny)[0])


def test_a_replayed_block_gets_back_a_forward_set_on_its_instance(tiny):
    """Hook libraries (accelerate's offloading) set ``forward`` on a module instance; replaying the
    block over it must leave that forward in place afterwards, and a block without one as it was."""
    from edgekd.methods.prune import decoder_layers
    from edgekd.methods.sensitivity import replayed

    first, second = decoder_layers(tiny)[:2]
    own = first.forward  # a bound method set on the instance, as a hook library would
    first.forward = own
    try:
        with replayed([first, second], ["a", "b"]):
            assert first() == "a" and second() == "b"
        assert vars(first)["forward"] is own and "forward" not in vars(second)
    finally:
        vars(first).pop("forward", None)
