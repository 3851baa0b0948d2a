import json
import re

import numpy as np

from duet_bus.cli import main
from duet_bus.data.prep import PrepConfig
from duet_bus.evaluate import EvalConfig, evaluate
from duet_bus.tasks.recommendation import finetune_scores
from duet_bus.finetune import FinetuneConfig
from duet_bus.models import ModelConfig
from duet_bus.train import TrainConfig, predict, train_model


def test_evaluate_document_has_every_method_and_metric(udata):
    config = EvalConfig(
        data_path=str(udata), backbone="gru4rec", seeds=(0, 1),
        prep=PrepConfig(history_len=5, eval_negatives=20), train=TrainConfig(epochs=1, batch_size=64),
    )
    doc = evaluate(config, show_progress=False)
    assert doc["dataset"] == "ml-100k" and doc["backbone"] == "gru4rec" and doc["seeds"] == [0, 1]
    assert set(doc["methods"]) == {"base", "finetune", "duet_no_swa", "duet"}
    for name, m in doc["methods"].items():
        for key in ("auc_mean", "auc_std", "gauc_mean", "ndcg10_mean", "hr10_mean", "delay_ms_p50"):
            assert np.isfinite(m[key]), (name, key)
        assert len(m["per_seed"]) == 2
    assert doc["methods"]["base"]["delay_ms_p50"] == 0
    assert doc["methods"]["finetune"]["delay_ms_p50"] > 0 and doc["methods"]["finetune"]["needs_labels"]
    assert doc["device"]["params"] > 0 and doc["device"]["flops_per_sample"] > 0
    json.dumps(doc)


def test_finetune_moves_only_the_classifier_and_restores_it(tiny):
    result = train_model(tiny, ModelConfig(backbone="sasrec"), TrainConfig(epochs=1, batch_size=64), seed=0)
    model = result.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores, millis = finetune_scores(model, tiny, FinetuneConfig(steps=3, lr=0.05), seed=0)
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # head restored, backbone untouched
    assert scores.shape == (tiny.n_users, 21) and (millis > 0).all()
    assert not np.allclose(scores, predict(model, tiny.eval_samples("test")))  # the steps changed predictions


def test_cli_evaluate_writes_json_and_reports_bad_paths(udata, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["evaluate", "--data-path", str(udata), "--backbone", "din", "--seeds", "1", "--epochs", "1",
                 "--methods", "base,duet", "--eval-negatives", "20", "--history-len", "5", "--generator-hidden", "8",
                 "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc["methods"]) == {"base", "duet"} and doc["config"]["swa"]["hidden_dim"] == 8
    # No terminal here: a line per seed as it finishes, with its scores, is what a log shows of the run.
    auc = doc["methods"]["duet"]["per_seed"][0]["auc"]
    assert re.search(rf"seed 0 \(1 of 1, \d+ s\): auc base 0\.\d{{4}}, duet {auc:.4f}", capsys.readouterr().out)
    assert main(["evaluate", "--data-path", str(tmp_path / "missing.data"), "--seeds", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["evaluate", "--generator-hidden", "0"]) == 2
    assert "--generator-hidden: must be a positive integer, got 0" in capsys.readouterr().err


def test_cli_evaluate_on_a_csv_click_log(udata, tmp_path, capsys):
    """`duet evaluate --dataset csv`: a click log of one's own, evaluated as MovieLens is; its source (with the
    users left out) in the document."""
    log = tmp_path / "clicks.csv"
    rows = [line.split("\t") for line in udata.read_text().splitlines()]
    log.write_text("user,item,timestamp\n" + "".join(f"u{u},i{i},{t}\n" for u, i, _, t in rows) + "late,i1,1\n")
    out = tmp_path / "e.json"
    assert main(["evaluate", "--dataset", "csv", "--data-path", str(log), "--seeds", "1", "--epochs", "1",
                 "--history-len", "5", "--eval-negatives", "20", "--methods", "base,duet", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "csv" and set(doc["methods"]) == {"base", "duet"}
    assert doc["source"] == "clicks.csv (1 of 25 users, with fewer than 3 interactions, left out)"


def test_flops_count_the_transformer_layer(tiny):
    from duet_bus.tasks.recommendation import device_cost
    from duet_bus.models import build_model

    sasrec = device_cost(build_model(ModelConfig(backbone="sasrec"), tiny.n_items, 5), tiny)
    # One layer over 5 positions: q/k/v/out projections alone are 5 * 4 * 32 * 32 multiply-adds.
    assert sasrec["flops_per_sample"] > 2 * 5 * 4 * 32 * 32


def test_a_cached_evaluation_resumes_and_extends_by_seeds(udata, tmp_path, monkeypatch):
    """`duet evaluate --cache DIR`: a seed already in the cache is read, not run; more seeds run only
    the new ones; the document is the one a run without the cache writes."""
    from dataclasses import replace

    from duet_bus.tasks.recommendation import Recommendation

    config = EvalConfig(data_path=str(udata), backbone="gru4rec", seeds=(0,), methods=("base", "duet"),
                        prep=PrepConfig(history_len=5, eval_negatives=20), train=TrainConfig(epochs=1, batch_size=64))
    cache = tmp_path / "cache"
    first = evaluate(config, show_progress=False, cache_dir=cache)
    ran = []
    original = Recommendation.run_seed
    monkeypatch.setattr(Recommendation, "run_seed", lambda self, c, seed, p: ran.append(seed) or original(self, c, seed, p))
    again = evaluate(config, show_progress=False, cache_dir=cache)
    assert ran == [] and again["methods"] == first["methods"]
    more = evaluate(replace(config, seeds=(0, 1)), show_progress=False, cache_dir=cache)
    assert ran == [1] and more["methods"]["duet"]["per_seed"][0] == first["methods"]["duet"]["per_seed"][0]
    assert len(list(cache.glob("*.json"))) == 2
    other = evaluate(replace(config, methods=("base",)), show_progress=False, cache_dir=cache)  # another recipe
    assert ran == [1, 0] and set(other["methods"]) == {"base"}


def test_training_to_a_log_says_each_epoch_as_it_ends(tiny, capsys):
    # No terminal here (as in a CI log): the progress bars do not show, a line per epoch does.
    result = train_model(tiny, ModelConfig(backbone="din"), TrainConfig(epochs=2, patience=5), seed=0,
                         label="seed 0 base")
    out = capsys.readouterr().out
    assert len(result.log) == 2
    for epoch in (1, 2):
        assert re.search(rf"seed 0 base epoch {epoch}: \d+ steps in \d+\.\d s", out), out

