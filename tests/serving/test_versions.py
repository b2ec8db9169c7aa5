"""engine.deploy.versions: versions under one root, an atomic pointer switch, retention and rollback; a publisher
SIGKILLed at any moment (random times, and right before / after each rename) leaves CURRENT serving and no
half-written version visible."""
import multiprocessing
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from engine import BAHEScorer
from engine.deploy import versions as versions_module
from engine.deploy.versions import POINTER_FILE, VERSIONS_DIR, ScorerVersions, VersionError
from tests.serving.test_scorer import ITEMS, make_scorer, random_users
from weights.atomic import TEMP_MARK

FORK = multiprocessing.get_context("fork")
USERS = random_users(np.random.default_rng(3), 4)


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    """Two saved scorers that score differently: 'old' and 'new', and their probe scores."""
    tmp = tmp_path_factory.mktemp("versions")
    old = make_scorer(tiny_checkpoints["llama"], tmp / "a")
    old.save_pretrained(tmp / "old")
    with torch.no_grad():
        for p in old.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    old.save_pretrained(tmp / "new")
    scores = {name: BAHEScorer.from_pretrained(tmp / name, device="cpu").score(USERS, ITEMS) for name in ("old", "new")}
    assert not np.allclose(scores["old"], scores["new"])
    return tmp, scores


def _publish(root, source, keep=3, note=None):
    with ScorerVersions(root, keep).stage() as staged:
        shutil.rmtree(staged.path)
        shutil.copytree(source, staged.path)
        return staged.publish(note)


def _current_scores(root):
    return BAHEScorer.from_pretrained(ScorerVersions(root).current().path, device="cpu").score(USERS, ITEMS)


def _visible(root):
    """Names in the versions folder: published versions and any leftover."""
    return sorted(p.name for p in (root / VERSIONS_DIR).iterdir())


def test_publish_keeps_the_last_n_and_rollback_walks_back(folders, tmp_path):
    tmp, scores = folders
    root = tmp_path / "root"
    versions = ScorerVersions.create(root, tmp / "old", keep=3)
    assert versions.current().name == "v000001" and versions.current().note["source"] == str((tmp / "old").resolve())
    np.testing.assert_array_equal(_current_scores(root), scores["old"])
    for k in range(2, 6):
        made = _publish(root, tmp / ("new" if k % 2 == 0 else "old"), note={"k": k})
        assert made.name == f"v{k:06d}" and ScorerVersions(root).current().note["k"] == k
    assert [v.name for v in versions.history()] == ["v000003", "v000004", "v000005"]
    assert _visible(root) == ["v000003", "v000004", "v000005"]  # older ones deleted
    np.testing.assert_array_equal(_current_scores(root), scores["old"])  # v5 is a copy of 'old'
    assert versions.rollback().name == "v000004"
    np.testing.assert_array_equal(_current_scores(root), scores["new"])
    assert versions.rollback().name == "v000003"
    with pytest.raises(VersionError, match="no earlier version to roll back to"):
        versions.rollback()
    assert versions.current().name == "v000003"
    assert _publish(root, tmp / "new").name == "v000006"  # names are never reused, even rolled-back ones
    assert _visible(root) == ["v000003", "v000006"]


def test_a_failed_stage_leaves_nothing_and_bad_roots_are_refused(folders, tmp_path):
    tmp, scores = folders
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp / "old")
    with pytest.raises(RuntimeError, match="gate said no"):
        with ScorerVersions(root).stage() as staged:
            shutil.rmtree(staged.path)
            shutil.copytree(tmp / "new", staged.path)
            raise RuntimeError("gate said no")
    assert _visible(root) == ["v000001"]
    with pytest.raises(VersionError, match="holds no scorer.json"):
        with ScorerVersions(root).stage() as staged:
            staged.publish()
    with pytest.raises(VersionError, match="is a version root already"):
        ScorerVersions.create(root, tmp / "old")
    with pytest.raises(VersionError, match="not a scorer folder"):
        ScorerVersions.create(tmp_path / "other", tmp_path)
    with pytest.raises(VersionError, match="current.json is missing"):
        ScorerVersions(tmp_path / "nothing").current()
    (root / POINTER_FILE).write_text('{"format": "bahe-versions", "current": "v9", "history": []}')
    with pytest.raises(VersionError, match="not a version pointer"):
        ScorerVersions(root).current()
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        ScorerVersions(root, keep=0)


def _child(work):
    """Run `work()` in a forked child process (SIGKILLed like any other)."""
    def main():
        torch.set_num_threads(1)
        work()
    child = FORK.Process(target=main, daemon=True)
    child.start()
    return child


def _die_after(name):
    """Replace versions_module.<name> (in the child) by a call that does the real thing, then SIGKILLs itself."""
    real = getattr(versions_module, name)

    def dying(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return dying


@pytest.mark.parametrize("moment", ["copying", "after the folder rename", "after the pointer switch", "random"])
def test_a_publisher_killed_at_any_moment_leaves_current_serving(folders, tmp_path, moment):
    tmp, scores = folders
    root = tmp_path / "root"
    ScorerVersions.create(root, tmp / "old")

    def publish():
        if moment == "after the folder rename":
            versions_module.fsync_dir = _die_after("fsync_dir")  # the fsync right after the rename
        elif moment == "after the pointer switch":
            versions_module.remove_path = _die_after("remove_path")  # the first prune after the switch
            versions_module.ScorerVersions.keep = 1
        _publish(root, tmp / "new", keep=1 if moment == "after the pointer switch" else 3)

    start = time.perf_counter()
    child = _child(publish)
    if moment == "copying":  # kill as soon as the staged folder shows up
        while not any(TEMP_MARK in p.name for p in (root / VERSIONS_DIR).iterdir()):
            assert child.is_alive() and time.perf_counter() - start < 60
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    elif moment == "random":
        time.sleep(float(np.random.default_rng(5).uniform(0, 0.3)))
        os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert child.exitcode in (0, -signal.SIGKILL)
    versions = ScorerVersions(root)
    current = versions.current().name
    expected = {"copying": ["v000001"], "after the folder rename": ["v000001"],
                "after the pointer switch": ["v000002"]}.get(moment, ["v000001", "v000002"])
    assert current in expected, f"{moment}: current is {current}"
    np.testing.assert_array_equal(_current_scores(root), scores["old" if current == "v000001" else "new"])
    for version in versions.history():  # every version the pointer names loads whole
        BAHEScorer.from_pretrained(version.path, device="cpu")
    # the next publisher cleans up: no temp folder, no unpublished folder, pruning finished
    renamed_in = (root / VERSIONS_DIR / "v000002").exists()
    made = _publish(root, tmp / "new", keep=1)
    assert _visible(root) == [made.name]
    assert made.name == ("v000003" if renamed_in else "v000002")  # a folder once renamed in: its name is not reused
    np.testing.assert_array_equal(_current_scores(root), scores["new"])
