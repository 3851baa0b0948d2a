import numpy as np
import pytest
import torch

from duet_bus import checkpoint
from duet_bus.errors import CheckpointError, ConfigError
from duet_bus.models import BACKBONES, ModelConfig, PPGConfig, build_model
from duet_bus.models.dynamic import Factored, SessionLayout, apply_by_session, apply_dynamic, stack_layers
from duet_bus.models.swa import mix, swa_weights
from duet_bus.train import TrainConfig, predict, train_model


def batch(n_items=30, b=6, length=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    seq = torch.randint(1, n_items + 1, (b, length), generator=g)
    seq[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return seq, lengths, torch.randint(1, n_items + 1, (b, k), generator=g)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("ppg", [None, PPGConfig(n_generators=1), PPGConfig(n_generators=3)])
def test_shapes_and_batched_generation_equals_one_by_one(backbone, ppg):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, ppg=ppg), n_items=30, history_len=5).eval()
    seq, lengths, targets = batch()
    with torch.no_grad():
        logits = model(seq, lengths, seq, lengths, targets)
        assert logits.shape == (6, 4)
        single = torch.cat([model(seq[i : i + 1], lengths[i : i + 1], seq[i : i + 1], lengths[i : i + 1],
                                  targets[i : i + 1]) for i in range(6)])
    assert torch.allclose(logits, single, atol=1e-5)


def test_session_batches_hold_whole_sessions_once_each(tiny):
    from duet_bus.train import session_batches, session_rows

    batches = session_batches(tiny, 16, np.random.default_rng(0))
    every = np.concatenate(batches)
    assert np.array_equal(np.sort(every), np.arange(len(tiny.train_user)))  # every sample exactly once
    samples = tiny.train_samples(np.random.default_rng(1), 1.0)
    key = tiny.train_user * 10_000 + tiny.train_session_start
    for index in batches:
        assert len(set(key[index])) == len(np.unique(key[index]))
        # Whole sessions: a session in a batch has all its samples there, and no other batch has any.
        assert all(np.sum(key == k) == np.sum(key[index] == k) for k in np.unique(key[index]))
        rows = session_rows(samples.take(index)).numpy()
        assert np.array_equal(np.unique(rows), np.arange(len(np.unique(key[index]))))
        assert all(len(set(key[index][rows == r])) == 1 for r in np.unique(rows))
    assert np.mean([len(b) for b in batches[:-1]]) == pytest.approx(16, abs=5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batches_smaller_than_a_session_hold_one_session_each(tiny, batch_size):
    """A batch ends with a whole session, so below a session's length each holds one: never an empty one
    (an empty batch once stopped training with a reshape error at `--batch-size 1`)."""
    from duet_bus.train import session_batches

    batches = session_batches(tiny, batch_size, np.random.default_rng(0))
    key = tiny.train_user * 10_000 + tiny.train_session_start
    assert all(len(np.unique(key[index])) == 1 for index in batches)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(tiny.train_user)))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_batch_of_sessions_scores_as_sample_by_sample(tiny, backbone):
    """Training's session layout (real-time clicks encoded, layers generated and applied once per session)
    gives the per-sample logits to float rounding, for every backbone."""
    from duet_bus.train import session_batches, session_rows, tensors

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, ppg=PPGConfig(n_generators=3)), tiny.n_items, 5).eval()
    samples = tiny.train_samples(np.random.default_rng(0), 1.0)
    index = session_batches(tiny, 40, np.random.default_rng(0))[1]
    x = tensors(samples.take(index))
    rows = session_rows(samples.take(index))
    with torch.no_grad():
        alone = model(**x)
        if model.backbone.summary_is_features:
            # The session's real-time clicks are its first sample's history: their encoding is read off
            # the features, not computed again.
            model.backbone.summarize = lambda *a: pytest.fail("encoded the real-time clicks a second time")
        grouped = model(**x, sessions=rows)
    assert grouped.shape == alone.shape and torch.allclose(grouped, alone, atol=1e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_session_layout_encodes_real_time_clicks_that_are_not_a_history(tiny, backbone):
    """Real-time clicks that differ from the first sample's history (any caller may pass such a batch)
    are encoded on their own: the result is still the per-sample one."""
    from duet_bus.train import session_batches, session_rows, tensors

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, ppg=PPGConfig(n_generators=3)), tiny.n_items, 5).eval()
    samples = tiny.train_samples(np.random.default_rng(0), 1.0)
    index = session_batches(tiny, 40, np.random.default_rng(0))[1]
    x = tensors(samples.take(index))
    x["realtime"] = torch.where(x["realtime"] > 0, x["realtime"] % tiny.n_items + 1, 0)
    with torch.no_grad():
        grouped = model(**x, sessions=session_rows(samples.take(index)))
        alone = model(**x)
    assert torch.allclose(grouped, alone, atol=1e-5)


def test_serving_after_a_fused_optimizer_step_uses_the_new_generator():
    """A fused optimizer updates parameters without bumping their versions: the serving cache of the
    SWA mixture must not outlive a training step (it once held validation at the first epoch)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="gru4rec", ppg=PPGConfig(n_generators=3)), n_items=30, history_len=5)
    seq, lengths, targets = batch()
    model.eval()
    with torch.inference_mode():
        before = model.weights_for(seq, lengths)[0][0].clone()  # fills the cache
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    model(seq, lengths, seq, lengths, targets).sum().backward()
    optimizer.step()
    model.eval()
    with torch.inference_mode():
        served = model.weights_for(seq, lengths)[0][0]
        model.head._cache = None
        fresh = model.weights_for(seq, lengths)[0][0]
    assert not torch.allclose(served, before) and torch.equal(served, fresh)


def test_a_factored_reply_takes_the_served_factors_wherever_gradients_are_on():
    """A device combines every factored reply with the generator's shared ``W2``, ``b2``: they come from the
    serving cache, not from mixing the generators again (with autograd, when gradients are on: 10 ms a
    MobileNetV3-Small reply), and they are the mixture's values."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="gru4rec", ppg=PPGConfig(n_generators=3)), n_items=30, history_len=5)
    model.eval()
    head = model.head
    layers = [(torch.randn(32, 32), torch.randn(32)), (torch.randn(32, 32), torch.randn(32))]
    with torch.enable_grad():
        first, again = head.unfactor(layers), head.unfactor(layers)
        mixed = [g.mixed(p) for g, p in zip(head.generators, head.swa_p())]  # the mixture, formed again
    for one, two, parts in zip(first, again, mixed):
        assert one.w2 is two.w2 and not one.w2.requires_grad  # one cached mixture, no graph behind it
        assert torch.equal(one.w2, parts[2]) and torch.equal(one.b2, parts[3])


def test_apply_dynamic_matches_a_python_loop():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8)
    weights = [(torch.randn(5, 8, 4), torch.randn(5, 4)), (torch.randn(5, 4, 2), torch.randn(5, 2))]
    out = apply_dynamic(x, weights)
    for i in range(5):
        h = torch.relu(x[i] @ weights[0][0][i] + weights[0][1][i])
        assert torch.allclose(out[i], h @ weights[1][0][i] + weights[1][1][i], atol=1e-6)


@pytest.mark.parametrize("sample_shape", [(8,), (3, 8)])
def test_sessions_of_one_length_are_laid_out_by_reshaping_to_the_bit(monkeypatch, sample_shape):
    """Sessions that all have the same number of samples (a runner's and fine-tuning's mostly do) skip the
    padded grid: the same values in the same order, so the same output to the bit; others are padded."""
    torch.manual_seed(0)
    features = torch.randn(12, *sample_shape)
    weights = [(torch.randn(3, 8, 4), torch.randn(3, 4)), (torch.randn(3, 4, 2), torch.randn(3, 2))]
    layout = SessionLayout.of_lengths([4, 4, 4])
    assert layout.even and not SessionLayout.of_lengths([4, 2, 6]).even
    reshaped = apply_by_session(features, weights, layout)
    monkeypatch.setattr(SessionLayout, "even", property(lambda self: False))
    padded = apply_by_session(features, weights, layout)
    assert reshaped.shape == (12, *sample_shape[:-1], 2) and torch.equal(reshaped, padded)
    for i in range(3):  # each session's layers on its own samples
        torch.testing.assert_close(reshaped[4 * i: 4 * i + 4], apply_dynamic(
            features[4 * i: 4 * i + 4], [(w[i], b[i]) for w, b in weights]))


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_padding_does_not_leak_into_sequence_state(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone), n_items=30, history_len=5).eval()
    seq = torch.tensor([[3, 4, 0, 0, 0]])
    full = torch.tensor([[3, 4, 9, 9, 9]])  # same prefix, other items after the length
    n = torch.tensor([2])
    with torch.no_grad():
        assert torch.allclose(model.backbone.encode(seq, n), model.backbone.encode(full, n), atol=1e-6)


def test_swa_weights_are_a_tempered_softmax_of_similarity_row_sums():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5)
    p = swa_weights(w, tau=0.5, detach=False)
    flat = w.flatten(1)
    rows = (flat @ flat.T).sum(1)
    assert rows.sum() >= 0  # sum of S is ||sum_i W_i||^2
    assert torch.allclose(p, torch.softmax(rows / (0.5 * rows.sum()), 0))
    assert torch.allclose(mix(w, p), sum(p[i] * w[i] for i in range(4)))
    assert torch.allclose(swa_weights(w[:1], 0.1, True), torch.ones(1))


@pytest.mark.parametrize("detach_p", [True, False])
def test_one_generator_is_used_as_it_is_the_same_to_the_bit_as_mixing_it(detach_p):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="din", ppg=PPGConfig(n_generators=1, detach_p=detach_p)), 30, 5)
    head = model.head
    seq, lengths, targets = batch()
    results = []
    for mixed in (False, True):
        if mixed:  # the general path: S, p and the p-weighted sum over a bank of one
            head._mixed_generators = lambda: [g.mixed(p) for g, p in zip(head.generators, head.swa_p())]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        logits = model(seq, lengths, seq, lengths, targets)
        logits.sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in head.parameters()]))
    (logits, grads), (logits_mixed, grads_mixed) = results
    assert torch.equal(logits, logits_mixed)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_mixed))


def test_detached_p_blocks_gradient_through_the_mixing_weights():
    w = torch.randn(3, 4, requires_grad=True)
    p = swa_weights(w, 0.1, detach=True)
    assert not p.requires_grad
    assert swa_weights(w, 0.1, detach=False).requires_grad


def test_generator_heads_are_registered_trained_and_checkpointed(tiny, tmp_path):
    config = ModelConfig(backbone="gru4rec", ppg=PPGConfig(n_generators=3))
    torch.manual_seed(0)
    before = build_model(config, tiny.n_items, tiny.config.history_len).state_dict()
    gen_keys = [k for k in before if k.startswith("head.generators.")]
    assert {k.split(".")[-1] for k in gen_keys} == {"w1", "b1", "w2", "b2", "wb", "bb"}
    result = train_model(tiny, config, TrainConfig(epochs=2, batch_size=64, patience=5), seed=0)
    after = result.model.state_dict()
    for key in gen_keys:
        assert not torch.equal(before[key], after[key]), f"{key} did not train"

    path = tmp_path / "model.pt"
    version = checkpoint.save(path, result.model, tiny)
    loaded = checkpoint.load(path)
    assert loaded.model_version == version
    test = tiny.eval_samples("test")
    assert np.array_equal(predict(result.model, test), predict(loaded.model, test))


def test_checkpoint_errors_name_the_file(tmp_path, duet_checkpoint_file):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    # One line, and never torch's advice to load it with weights_only=False (running the file's code).
    with pytest.raises(CheckpointError, match=r"^\S*bad.pt: not a duet-bus checkpoint \(not a file of weights") as err:
        checkpoint.load(bad)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(duet_checkpoint_file.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut.pt: not a readable checkpoint, cut short or corrupt\? "
                                              r"\(RuntimeError: PytorchStreamReader failed") as err:
        checkpoint.load(cut)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value, reason", [
    ("task", "speech", "cannot be rebuilt .*unknown task 'speech'"),
    ("model_config", {"backbone": "gru4rec"}, "cannot be rebuilt .*KeyError"),
    ("model_config", [1, 2], "cannot be rebuilt"),
    ("prep_config", {"history_len": -1, "sessions": {}}, "cannot be rebuilt .*data.history_len"),
    ("global_layers", 7, "weights do not fit"),
])
def test_a_checkpoint_with_a_doctored_record_is_named(duet_checkpoint_file, tmp_path, field, value, reason):
    import torch

    blob = torch.load(duet_checkpoint_file, weights_only=True)
    blob[field] = value
    doctored = tmp_path / "doctored.pt"
    torch.save(blob, doctored)
    with pytest.raises(CheckpointError, match=f"doctored.pt: .*{reason}"):
        checkpoint.load(doctored)


def test_training_selects_on_validation_and_never_reads_test(tiny, monkeypatch):
    original = type(tiny).eval_samples

    def guarded(self, split, users=None):
        assert split != "test", "training read the test split"
        return original(self, split, users)

    monkeypatch.setattr(type(tiny), "eval_samples", guarded)
    result = train_model(tiny, ModelConfig(backbone="sasrec"), TrainConfig(epochs=3, batch_size=64), seed=1)
    assert result.best_valid_auc == max(e.valid_auc for e in result.log)
    assert result.log[result.best_epoch - 1].valid_auc == result.best_valid_auc


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.ppg.n_generators"):
        PPGConfig(n_generators=0)
    with pytest.raises(ConfigError, match="train.gamma"):
        TrainConfig(gamma=0)
    with pytest.raises(ConfigError, match="model.backbone"):
        build_model(ModelConfig(backbone="bert"), 10, 5)


def test_score_many_mixes_global_full_and_factored_layers(tiny):
    """One batch may hold fallen-back sessions (the global classifier), full and factored replies."""
    from duet_bus.data.streams import offline_test_sessions
    from duet_bus.train import tensors

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="din", ppg=PPGConfig(n_generators=2)), tiny.n_items, 5).eval()
    sessions = [s.samples for s in offline_test_sessions(tiny)[:3]]
    with torch.inference_mode():
        x = [tensors(s) for s in sessions]
        factored = model.weights_for(x[1]["realtime"], x[1]["realtime_len"], factored=True)
        full = [(w[0], b[0]) for w, b in model.weights_for(x[2]["realtime"], x[2]["realtime_len"])]
        glob = [(torch.randn(i, o), torch.randn(o)) for i, o in model.dynamic_shapes]
        weights = [glob, factored, full]
        batched = model.score_many(sessions, weights)
        for s, w, out in zip(sessions, weights, batched):
            np.testing.assert_allclose(out, model.score_samples(s, w), atol=1e-5)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_inference_looks_targets_up_and_the_table_follows_training(backbone):
    """Serving looks the target tower up per item (`_TowerScored._every_target`): the same as running it,
    and never a table of weights that training or loading has since changed."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone), n_items=30, history_len=5)
    tower = model.backbone
    seq, lengths, targets = batch()
    model.eval()
    with torch.no_grad():
        looked_up = tower.target_side(targets)
        run = tower.target_tower(tower.item_emb(targets))
    torch.testing.assert_close(looked_up, run, rtol=1e-6, atol=1e-6)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)  # no version bump
    model(seq, lengths, seq, lengths, targets).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = tower.target_side(targets)
        torch.testing.assert_close(after, tower.target_tower(tower.item_emb(targets)), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(after, looked_up)
        other = build_model(ModelConfig(backbone=backbone), n_items=30, history_len=5).eval()
        model.load_state_dict(other.state_dict())  # in eval mode: the versions tell
        torch.testing.assert_close(tower.target_side(targets), other.backbone.target_side(targets))


def test_fine_tuning_takes_torchs_fused_adam_steps_to_the_bit():
    from duet_bus.finetune import FinetuneConfig, adam_steps

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    start = [(torch.randn(8, 8), torch.randn(8)), (torch.randn(8, 4), torch.randn(4))]

    def loss_of(layers):
        (w1, b1), (w2, b2) = layers
        return ((torch.relu(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()

    config = FinetuneConfig(steps=7, lr=3e-3)
    ours = adam_steps(start, loss_of, config)
    params = [t.clone().requires_grad_(True) for layer in start for t in layer]
    optimizer = torch.optim.Adam(params, lr=config.lr, fused=True)
    for _ in range(config.steps):
        optimizer.zero_grad()
        loss_of([params[0:2], params[2:4]]).backward()
        optimizer.step()
    for got, want in zip([t for layer in ours for t in layer], params):
        assert torch.equal(got, want.detach())


def test_stacking_sessions_layers_keeps_each_sessions_own_whatever_form_it_came_in():
    """Replies' full layers, a fallback's global classifier (parameters) and formed factored layers (a batch
    of one) stack into one session axis, each session's slice its own layers."""
    torch.manual_seed(0)
    full = [(torch.randn(4, 3), torch.randn(3)), (torch.randn(3, 1), torch.randn(1))]
    glob = [(torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))),
            (torch.nn.Parameter(torch.randn(3, 1)), torch.nn.Parameter(torch.randn(1)))]
    factored = [Factored(torch.randn(1, 4, 2), torch.randn(2, 3), torch.randn(3), torch.randn(1, 3)),
                Factored(torch.randn(1, 3, 2), torch.randn(2, 1), torch.randn(1), torch.randn(1, 1))]
    sessions = [full, glob, factored, full]
    with torch.no_grad():
        stacked = stack_layers(sessions)
        for n, (w, b) in enumerate(stacked):
            assert w.shape == (4, *full[n][0].shape) and b.shape == (4, *full[n][1].shape)
            for i, layers in enumerate(sessions):
                want_w, want_b = layers[n].materialize() if isinstance(layers[n], Factored) else layers[n]
                assert torch.equal(w[i], want_w.reshape(w.shape[1:])) and torch.equal(b[i], want_b.reshape(-1))
        # All factored: they stay factored (one shared W2), the per-session parts stacked.
        both = stack_layers([factored, factored])
        assert all(isinstance(layer, Factored) and layer.h.size(0) == 2 for layer in both)


def test_register_backbone_takes_only_new_names_and_backbones():
    from duet_bus.models import Backbone, register_backbone

    class Mine(Backbone):
        pass

    with pytest.raises(ValueError, match="register_backbone\\('gru4rec'\\): a built-in backbone's name"):
        register_backbone("gru4rec")(Mine)
    with pytest.raises(TypeError, match="is not a Backbone subclass"):
        register_backbone("mine")(object)
    assert "mine" not in BACKBONES and BACKBONES["gru4rec"].__name__ == "GRU4Rec"
