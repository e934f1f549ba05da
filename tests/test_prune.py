import numpy as np
import pytest
import torch

from edgekd import EdgekdError
from edgekd.methods.prune import (
    BlockScores,
    loss_increase_scores,
    make_student,
    mlp_channel_importance,
    prune_mlp_width,
    resolve_keep_layers,
    score_blocks,
    select_layers,
    spearman,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def calib(tiny):
    return np.random.default_rng(0).integers(0, tiny.config.vocab_size, size=(4, 32)).astype(np.int32)


def test_block_influence_matches_direct_computation(tiny, calib):
    head_positions = []  # the scores read the block boundaries only: the head runs on one position, not all 32
    hook = tiny.lm_head.register_forward_hook(lambda mod, args, out: head_positions.append(out.shape[1]))
    scores = score_blocks(tiny, calib, batch_size=2)
    hook.remove()
    assert head_positions == [1, 1]
    with torch.no_grad():
        hs = tiny(input_ids=torch.from_numpy(calib.astype(np.int64)), output_hidden_states=True).hidden_states
    # hidden_states[i] is block i's input for i < L (the last entry is after the final norm)
    for i in range(len(scores.block_influence) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item()
        assert scores.block_influence[i] == pytest.approx(1 - cos, abs=1e-4)
    assert scores.calibration_tokens == calib.size
    ang1 = [np.arccos(1 - b) / np.pi for b in scores.block_influence]
    assert np.allclose(scores.angular_distance, ang1, atol=1e-4)
    assert len(scores.angular_windows[2]) == len(scores.block_influence) - 1


def test_selection_methods():
    s = BlockScores(block_influence=[0.5, 0.1, 0.3, 0.05, 0.9], angular_distance=[0] * 5,
                    angular_windows={2: [0.4, 0.2, 0.1, 0.3]}, loss_increase=[1.0, 0.5, 0.01, 0.2, 3.0])
    assert select_layers(s, 3, "block_influence") == [0, 2, 4]
    assert select_layers(s, 3, "angular") == [0, 1, 4]  # window starting at 2 has the smallest distance
    assert select_layers(s, 3, "loss_increase") == [0, 1, 4]
    assert select_layers(s, 5, "block_influence") == [0, 1, 2, 3, 4]


def test_keep_layers_forms():
    assert resolve_keep_layers(24, 30) == 24
    assert resolve_keep_layers(0.8, 30) == 24
    assert resolve_keep_layers(1.0, 30) == 30
    assert resolve_keep_layers("auto", 30) is None
    with pytest.raises(EdgekdError, match="has 30 layers"):
        resolve_keep_layers(40, 30)


def test_depth_pruning_round_trip_generate_and_layer_map(tiny, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    keep = [0, 2, 3]
    student = make_student(tiny, keep)
    assert len(tiny.model.layers) == 4  # teacher untouched
    assert student.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    # same weights as the teacher blocks they came from
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, tiny.model.layers[2].mlp.up_proj.weight)
    ids = torch.from_numpy(calib[:1, :12].astype(np.int64))
    with torch.no_grad():
        before = student(input_ids=ids).logits
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, before, atol=1e-5)
    # KV cache works after renumbering: cached greedy decoding equals the no-cache argmax path
    out = again.generate(ids, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            nxt = again(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_width_pruning_keeps_important_channels(tiny, calib, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(tiny)
    imp = mlp_channel_importance(model, calib)
    assert len(imp) == 4 and imp[0].shape == (128,)
    new = prune_mlp_width(model, imp, keep_fraction=0.5, multiple=32)
    assert new == 64 and model.config.intermediate_size == 64
    kept = torch.sort(torch.topk(imp[0], 64).indices).values
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, tiny.model.layers[0].mlp.down_proj.weight[:, kept])
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)


def test_loss_increase_of_skipping_matches_removing(tiny, calib):
    from edgekd.methods.prune import calibration_loss

    inc = loss_increase_scores(tiny, calib[:2])
    assert len(inc) == 4
    base = calibration_loss(tiny, calib[:2])
    removed = make_student(tiny, [0, 1, 3])
    assert inc[2] == pytest.approx(calibration_loss(removed, calib[:2]) - base, abs=1e-5)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
