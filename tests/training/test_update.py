"""engine.training.loops.update (`bahe update`): append-only tables, a warm start from CURRENT's weights, item counts
and seen-marks extended, the gate (both AUCs, the paired difference, the rule, --force), rollback, and an update
SIGKILLed mid-publish leaving CURRENT serving."""
import hashlib
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
from engine.cli import main
from engine.deploy import versions as versions_module
from engine.deploy.versions import VERSIONS_DIR, ScorerVersions
from engine.training.data.example_features import item_count_table
from engine.training.data.log_files import write_log
from engine.training.loops.ctr_models import BAHECTR
from engine.training.loops.train import TrainConfig, fit
from engine.training.loops import update as update_module
from engine.training.loops.update import GateRule, UpdateConfig, combined_log, grown_model, update_scorer
from engine.training.studies.experiment import build_scorer
from tests.synthetic_logs import tiny_movielens
from weights.atomic import process_start_time

LENIENT = GateRule(min_auc_gain=-1.0, max_logloss_increase=10.0, max_calibration_error=10.0, resamples=200)


def _shas(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def periods(tiny_checkpoints, tmp_path_factory):
    """CURRENT: a scorer trained on the fixture's first 60% of time; the old and the new period's logs."""
    tmp = tmp_path_factory.mktemp("update")
    log = tiny_movielens()
    times = np.sort(log.timestamp)
    cut = int(times[int(0.6 * times.size)])
    old, new = log.between(0, cut), log.between(cut, int(times[-1]) + 1)
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=log.sequence_names, max_behaviors=16,
                                            categorical_features=("user_id", "gender")))
    torch.manual_seed(0)
    scorer, _ = build_scorer(tiny_checkpoints["llama"], old, config, tmp / "tables", device="cpu", progress=False)
    bahe = BAHECTR(scorer, old)
    split = old.split()
    fit(bahe, old, split.train, split.val, TrainConfig(epochs=1, progress=False))
    bahe.store_item_counts(old, split.test_start)
    scorer.save_pretrained(tmp / "current")
    write_log(new, tmp / "new.parquet")
    write_log(old, tmp / "old.parquet")
    return tmp, old, new


def _lenient_update(tmp, root, *extra):
    """`bahe update` of the periods' CURRENT with LENIENT's gate flags, one epoch, on the CPU; `extra` flags after."""
    return ["update", "--scorer", str(tmp / "current"), "--data", str(tmp / "new.parquet"), "--out", str(root),
            "--epochs", "1", "--min-auc-gain", "-1", "--max-logloss-increase", "10", "--max-calibration-error", "10",
            "--device", "cpu", *extra]


def _config(epochs=1, rule=LENIENT, **kwargs):
    return UpdateConfig(train=TrainConfig(epochs=epochs, norm_batches=0, progress=False), gate=rule, **kwargs)


def test_update_appends_warm_starts_extends_and_publishes(periods, tmp_path):
    tmp, old, new = periods
    before = _shas(tmp / "current")
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp / "current")
    current = BAHEScorer.from_pretrained(tmp / "current", device="cpu")
    result = update_scorer(root, new, _config(epochs=0), device="cpu")  # no step: NEXT is CURRENT, warm-started
    assert result.current == "v000001" and result.published.name == "v000002"
    assert _shas(tmp / "current") == before  # CURRENT's folder only read
    nxt = BAHEScorer.from_pretrained(result.published.path, device="cpu")
    for which in ("behaviors", "items"):  # append-only: old rows byte for byte, then the new texts
        old_table, new_table = getattr(current, which), getattr(nxt, which)
        assert len(new_table) == len(old_table) + result.appended[which] and result.appended[which] > 0
        assert torch.equal(new_table.embeddings[:len(old_table)], old_table.embeddings)
        assert np.array_equal(new_table.keys[:len(old_table)], old_table.keys)
        assert (new_table.lookup(new.item_id_texts, on_missing="mark") >= 0).all()
    old_state, new_state = current.model.state_dict(), nxt.model.state_dict()
    trained = old_state["side.item_id.weight"].shape[0] - 1
    for key, value in old_state.items():  # every weight CURRENT's; the item rows grown from its unseen row
        if key == "side.item_id.weight":
            assert torch.equal(new_state[key][:trained], value[:trained])
            assert torch.equal(new_state[key][trained:], value[trained].expand(len(nxt.items) + 1 - trained, -1))
        elif key == "item_counts":  # extended by the new log's events, not restarted
            ids, by_item = item_count_table(new)
            rows = nxt.items.lookup([new.item_texts[int(i)] for i in ids])
            expected = torch.zeros_like(new_state[key])
            expected[:value.shape[0]] = value
            expected[torch.from_numpy(rows)] += torch.from_numpy(by_item)
            assert torch.equal(new_state[key], expected) and new_state[key].sum() > value.sum()
        else:
            assert torch.equal(new_state[key], value), key
    note = result.published.note
    assert note["previous"] == "v000001" and note["gate"]["passed"] and note["rows"]["gate"] > 0
    assert not list(root.glob(".update-work-*"))  # the work folder is gone after a success


def test_grown_current_scores_as_current_serves(periods, tmp_path):
    """The gate's CURRENT (its weights, grown item rows, NEXT's appended tables) is CURRENT as served: unknown texts
    encoded on the fly, new items in the unseen bucket."""
    tmp, old, new = periods
    current = BAHEScorer.from_pretrained(tmp / "current", device="cpu")
    texts = new.item_id_texts
    fresh = [t for t, row in zip(texts, current.items.lookup(texts, on_missing="mark")) if row < 0][:4]
    users = [{"liked": fresh[:2] + texts[:3], "watched": texts[3:6] + fresh[2:]}, {"disliked": fresh[1:]}]
    items, sides = fresh[:2], [{"user_id": 7, "gender": "F"}, {"user_id": 1}]
    served = current.score(users, items, side_features=sides)
    tables = tmp_path / "t"
    tables.mkdir()
    for name in ("behaviors", "items"):
        (tables / getattr(current, name).path.name).write_bytes(getattr(current, name).path.read_bytes())
    grown = BAHEScorer(config=current.config, checkpoint=current.checkpoint, encoder=current.encoder,
                       model=grown_model(current.model, len(current.items) + 10, len(current.behaviors) + 10),
                       behaviors=current.behaviors.open(tables / current.behaviors.path.name, current.encoder),
                       items=current.items.open(tables / current.items.path.name, current.encoder), device="cpu")
    grown.behaviors.append(texts)
    grown.items.append(texts)
    np.testing.assert_allclose(grown.score(users, items, side_features=sides), served, rtol=1e-5, atol=1e-6)


def test_gate_refuses_and_force_publishes(periods, tmp_path, capsys):
    tmp, old, new = periods
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp / "current")
    strict = GateRule(min_auc_gain=0.5, resamples=200)  # no model gains half an AUC point: refused
    result = update_scorer(root, new, _config(rule=strict), device="cpu")
    assert result.published is None and not result.gate.passed
    assert any(r.startswith("failed: AUC gain") for r in result.gate.reasons)
    assert ScorerVersions(root).current().name == "v000001"
    assert sorted(p.name for p in (root / VERSIONS_DIR).iterdir()) == ["v000001"]
    assert not [p for p in root.iterdir() if p.name.startswith(".update-work-")]
    d = result.gate.auc_difference
    assert d.low <= d.value <= d.high
    assert d.value == pytest.approx(result.gate.next["auc"] - result.gate.current["auc"])

    args = ["update", "--data", str(tmp / "new.parquet"), "--out", str(root), "--epochs", "1",
            "--min-auc-gain", "0.5", "--device", "cpu"]
    with pytest.raises(SystemExit, match="failed the gate and was not published; .* still serves v000001"):
        main(args)
    out = capsys.readouterr().out
    assert "CURRENT  AUC" in out and "NEXT     AUC" in out and "AUC(NEXT) - AUC(CURRENT) = " in out and "FAIL" in out
    main(args + ["--force"])
    assert "published v000002 (forced past the gate)" in capsys.readouterr().out
    assert ScorerVersions(root).current().note["forced"] is True
    main(["rollback", str(root)])
    assert f"{root}: now serving v000001 (was v000002)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no earlier version to roll back to"):
        main(["rollback", str(root)])


def test_update_with_history_and_replay_and_bad_inputs(periods, tmp_path, capsys):
    tmp, old, new = periods
    root = tmp_path / "root"
    main(_lenient_update(tmp, root, "--history", str(tmp / "old.parquet"), "--replay", "0.5"))
    out = capsys.readouterr().out
    assert "new version root, v000001" in out and "published v000002" in out
    note = ScorerVersions(root).current().note
    assert note["rows"]["replay"] == round(0.5 * note["rows"]["train"]) > 0
    with pytest.raises(ValueError, match="must end before the new log starts"):
        combined_log(old, new)
    with pytest.raises(ValueError, match="gate_fraction and val_fraction"):
        update_scorer(root, new, _config(gate_fraction=0.95), device="cpu")
    with pytest.raises(SystemExit, match="not the current version of"):
        main(["update", "--scorer", str(tmp / "current"), "--data", str(tmp / "new.parquet"), "--out", str(root)])
    with pytest.raises(SystemExit, match="--replay samples the older events of --history"):
        main(["update", "--data", str(tmp / "new.parquet"), "--out", str(root), "--replay", "0.2"])
    with pytest.raises(SystemExit, match="--distributed and --history with it are not built yet"):
        main(["update", "--data", str(tmp / "new.parquet"), "--out", str(root), "--stream", str(tmp_path / "w"),
              "--history", str(tmp / "old.parquet")])
    with pytest.raises(SystemExit, match="bahe update --distributed must be started by torchrun"):
        main(["update", "--data", str(tmp / "new.parquet"), "--out", str(root), "--distributed"])
    assert ScorerVersions(root).current().name == "v000002"


def test_update_killed_mid_publish_leaves_current_serving(periods, tmp_path):
    tmp, old, new = periods
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp / "current")
    served = BAHEScorer.from_pretrained(ScorerVersions(root).current().path, device="cpu").score(
        [{"liked": new.item_id_texts[:3]}], new.item_id_texts[3:4])

    def update():
        torch.set_num_threads(1)
        real = versions_module.fsync_dir

        def die_after_rename(folder):  # the folder is in place, the pointer not yet switched
            real(folder)
            os.kill(os.getpid(), signal.SIGKILL)
        versions_module.fsync_dir = die_after_rename
        update_scorer(root, new, _config(), device="cpu")
    child = multiprocessing.get_context("fork").Process(target=update, daemon=True)
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    assert ScorerVersions(root).current().name == "v000001"
    left = list(root.glob(".update-work-*"))  # a hard kill leaves its work folder; the next update removes it
    assert len(left) == 1
    past = process_start_time() - 60  # the killed update's folder predates the next update's process
    os.utime(left[0], (past, past))
    np.testing.assert_array_equal(BAHEScorer.from_pretrained(ScorerVersions(root).current().path, device="cpu").score(
        [{"liked": new.item_id_texts[:3]}], new.item_id_texts[3:4]), served)
    result = update_scorer(root, new, _config(), device="cpu")  # the next update cleans up and publishes
    assert result.published.name == "v000003"  # v000002 was renamed in, never published: its name is not reused
    assert sorted(p.name for p in (root / VERSIONS_DIR).iterdir()) == ["v000001", "v000003"]
    assert not list(root.glob(".update-work-*"))


def _terminated_mid_fit(root, new):
    torch.set_num_threads(1)
    real = update_module.fit

    def fit_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, while the update trains
        return real(*args, **kwargs)
    update_module.fit = fit_then_sigterm
    update_scorer(root, new, _config(), device="cpu")


def test_update_cleans_its_work_folder_on_error_and_sigterm(periods, tmp_path, monkeypatch):
    tmp, old, new = periods
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp / "current")

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory, say")
    monkeypatch.setattr(update_module, "fit", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        update_scorer(root, new, _config(), device="cpu")
    assert not list(root.glob(".update-work-*")) and ScorerVersions(root).current().name == "v000001"
    monkeypatch.undo()
    child = multiprocessing.get_context("fork").Process(target=_terminated_mid_fit, args=(root, new), daemon=True)
    child.start()
    child.join(300)
    assert child.exitcode == 128 + signal.SIGTERM  # SystemExit after the cleanup, not death by the signal
    assert not list(root.glob(".update-work-*")) and ScorerVersions(root).current().name == "v000001"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process's handler is untouched


def _update_rank(rank, port, argv, out):
    import contextlib
    import io
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(argv)
    (out / f"stdout.{rank}").write_text(printed.getvalue())


@pytest.mark.slow
def test_update_on_two_ranks_publishes_once(periods, tmp_path):
    """`bahe update --distributed` as torchrun runs it (its environment set per rank; forked, not launched)."""
    import socket

    import torch.multiprocessing as mp
    tmp, old, new = periods
    root = tmp_path / "root"
    argv = _lenient_update(tmp, root, "--batch-size", "64", "--distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_update_rank, args=(port, argv, tmp_path), nprocs=2, join=True, start_method="fork")
    said = (tmp_path / "stdout.0").read_text()
    assert "new version root, v000001" in said and "AUC(NEXT) - AUC(CURRENT)" in said and "published v000002" in said
    assert (tmp_path / "stdout.1").read_text() == ""  # rank 0 alone reports and publishes
    versions = ScorerVersions(root)
    assert [v.name for v in versions.history()] == ["v000001", "v000002"]
    assert sorted(p.name for p in (root / VERSIONS_DIR).iterdir()) == ["v000001", "v000002"]
    nxt = BAHEScorer.from_pretrained(versions.current().path, device="cpu")
    assert len(nxt.items) > len(BAHEScorer.from_pretrained(tmp / "current", device="cpu").items)


def test_streamed_update_gates_and_publishes(periods, tmp_path, capsys):
    """`bahe update --stream`: the new log laid out as user shards, fine-tuned shard by shard, gated on the stream's
    newest events; NEXT's tables and item counts as the in-memory update's."""
    tmp, old, new = periods
    root = tmp_path / "root"
    main(_lenient_update(tmp, root, "--stream", str(tmp_path / "work"), "--shards", "3"))
    out = capsys.readouterr().out
    assert "AUC(NEXT) - AUC(CURRENT)" in out and "published v000002" in out
    note = ScorerVersions(root).current().note
    assert note["stream"]["shards"] == 3 and note["rows"]["gate"] > 0 and note["rows"]["train"] > 0
    current = BAHEScorer.from_pretrained(tmp / "current", device="cpu")
    nxt = BAHEScorer.from_pretrained(ScorerVersions(root).current().path, device="cpu")
    assert torch.equal(nxt.behaviors.embeddings[:len(current.behaviors)], current.behaviors.embeddings)
    assert (nxt.items.lookup(new.item_id_texts, on_missing="mark") >= 0).all()
    ids, by_item = item_count_table(new)
    rows = torch.from_numpy(nxt.items.lookup([new.item_texts[int(i)] for i in ids]))
    expected = torch.zeros_like(nxt.model.item_counts)
    expected[:current.model.item_counts.shape[0]] = current.model.item_counts
    expected[rows] += torch.from_numpy(by_item)
    assert torch.equal(nxt.model.item_counts, expected)


@pytest.mark.parametrize("stream", [False, True])
def test_next_carries_currents_id_vocabulary_extended_with_the_new_log(periods, tmp_path, stream):
    """Before, NEXT's version folder had no ids.json: after an update, scoring by item id failed. Now it holds
    CURRENT's vocabulary (its ids keep their numbers) extended with the new log's ids; an item id of the new log
    whose text differs from CURRENT's refuses the update before training, nothing published."""
    import shutil
    from weights.id_vocabulary import FILE_NAME, IdError, VocabularyFile
    from engine.training.streaming.update_stream import update_streamed
    tmp, old, new = periods
    shutil.copytree(tmp / "current", tmp_path / "current")
    stored = VocabularyFile.update(tmp_path / "current" / FILE_NAME, old.user_key(np.unique(old.user)),
                                   dict(zip(old.item_key(old.item_ids), old.item_id_texts)))
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp_path / "current")

    def run():
        if stream:
            return update_streamed(root, tmp / "new.parquet", tmp_path / "work", _config(epochs=0), shards=2,
                                   device="cpu")
        return update_scorer(root, new, _config(epochs=0), device="cpu")
    result = run()
    carried = VocabularyFile.read(result.published.path / FILE_NAME)
    assert carried.users.keys[:len(stored.users)] == stored.users.keys
    assert carried.items.keys[:len(stored.items)] == stored.items.keys
    assert set(carried.users.keys) == set(stored.users.keys) | set(new.user_key(np.unique(new.user)))
    texts = dict(zip(carried.items.keys, carried.item_texts))
    assert all(texts[k] == t for k, t in zip(new.item_key(new.item_ids), new.item_id_texts))
    clash = str(new.item_key(new.item_ids[:1])[0])
    raw = VocabularyFile.read(result.published.path / FILE_NAME)
    raw.item_texts[raw.items.numbers([clash])[0]] = "another text"
    raw.write(result.published.path / FILE_NAME)
    with pytest.raises(IdError, match=rf"item '{clash}' has the text 'another text' in the vocabulary"):
        run()
    assert ScorerVersions(root).current().name == result.published.name  # nothing published


def test_next_carries_a_widened_training_record_only_when_current_has_one(periods, tmp_path):
    """NEXT's training.json: CURRENT's record joined with the fine-tuning's examples (every label before the gate
    period, CURRENT's users and the new log's), so the feature export refuses NEXT's in-sample logits; a CURRENT
    without a record gives a NEXT without one (the export refuses it whole)."""
    import shutil
    from engine.export.record import read_record, write_record
    tmp, old, new = periods
    plain = tmp_path / "plain"
    ScorerVersions.create(plain, tmp / "current")
    assert read_record(update_scorer(plain, new, _config(), device="cpu").published.path) is None
    recorded = tmp_path / "recorded-current"
    shutil.copytree(tmp / "current", recorded)
    prior = write_record(recorded, labels_before=int(new.timestamp.min()), users=["1", "2"], data="old.parquet",
                         examples=50)
    root = tmp_path / "root"
    ScorerVersions.create(root, recorded)
    result = update_scorer(root, new, _config(), device="cpu", source="new.parquet")
    record = read_record(result.published.path)
    assert record is not None and record.written_by == "bahe update" and record.data == "old.parquet + new.parquet"
    assert record.labels_before == result.gate_start > prior.labels_before
    assert set(record.users) == {"1", "2"} | set(new.user_key(np.unique(new.user)))
    assert record.examples == prior.examples + result.rows["train"] + result.rows["replay"] + result.rows["val"]
    gate_user = new.user_key(new.user[new.timestamp >= result.gate_start][:1])
    assert not record.saw(gate_user, np.array([result.gate_start]))[0]  # the gate period's labels stay unseen
    assert record.saw(gate_user, np.array([result.gate_start - 1]))[0]
