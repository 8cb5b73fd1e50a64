"""data.mix: weighted sources drawn deterministically, resumable on another dp layout with no
sample repeated or skipped, realised proportions within the bound data/mixture.py proves, bad
specs refused in one line; through the trainer, tokens per source in every metrics record."""
from __future__ import annotations

import json

import pytest

from dist_train.config import ConfigError, load_config
from dist_train.data import DataError, MixtureSampler
from tests.conftest import read_metrics, run_cli, sweep
from tests.equivalence import SGD, assert_values_match

SIZES, WEIGHTS, GB = [50, 23, 31], [0.5, 0.2, 0.3], 12


def _ranks(dp: int, micro: int = 1, **kw) -> list[MixtureSampler]:
    return [MixtureSampler(SIZES, WEIGHTS, global_batch=GB, micro_batch=micro, dp_size=dp, dp_rank=r, seed=7, **kw)
            for r in range(dp)]


def _step(samplers) -> list[int]:
    """One step of every rank, its samples in rank order (the global batch)."""
    return [int(i) for s in samplers for mb in s.next_step() for i in mb]


def _source_of(i: int) -> int:
    return 0 if i < SIZES[0] else 1 if i < SIZES[0] + SIZES[1] else 2


def test_resumed_on_another_dp_layout_neither_repeats_nor_skips():
    """7 steps on dp = 2, the state through JSON (as a checkpoint keeps it), 8 more on dp = 4
    with another micro-batch: the sample ids of the whole run are each source's passes over its
    samples, every full pass each sample exactly once and the last pass without a repeat, and
    the sequence is the uninterrupted dp = 1 run's."""
    first = _ranks(2)
    seen = [i for _ in range(7) for i in _step(first)]
    states = [s.state_dict() for s in first]
    assert all(st == states[0] for st in states)  # every rank holds the same global position
    second = _ranks(4, micro=3)
    for s in second:
        s.load_state_dict(json.loads(json.dumps(states[0])))
    seen += [i for _ in range(8) for i in _step(second)]
    assert len(seen) == 15 * GB
    straight = _ranks(1)
    assert seen == [i for _ in range(15) for i in _step(straight)]
    for src, n in enumerate(SIZES):
        drawn = [i for i in seen if _source_of(i) == src]
        assert len(drawn) > n  # every source was used up at least once, so passes are checked
        passes = [drawn[k:k + n] for k in range(0, len(drawn), n)]
        lo = sum(SIZES[:src])
        for p in passes[:-1]:
            assert sorted(p) == list(range(lo, lo + n)), f"source {src}: a pass repeats or skips a sample"
        assert len(set(passes[-1])) == len(passes[-1]), f"source {src}: the last pass repeats a sample"
    assert straight[0].source_counts() == second[0].source_counts()


@pytest.mark.parametrize("weights", [[0.5, 0.2, 0.3], [0.9, 0.1], [1, 1, 1, 5]])
def test_realised_proportions_stay_within_the_proven_bound(weights):
    """After every sample T, source i has had c_i in (w_i T - (n - 1), w_i T + 1) (n sources;
    data/mixture.py proves it); for two sources within one sample of its share."""
    n, total = len(weights), float(sum(weights))
    s = MixtureSampler([1000] * n, weights, global_batch=10, micro_batch=10, seed=1)
    counts = [0] * n
    for _ in range(100):
        for i in s.next_step()[0].tolist():
            counts[i // 1000] += 1
            t = sum(counts)
            for c, w in zip(counts, weights):
                share = w / total * t
                assert share - (n - 1) < c < share + 1 + 1e-9, (weights, t, counts)
    assert counts == s.source_counts()


def test_seeded_order_within_sources_and_state_checked():
    a = MixtureSampler(SIZES, WEIGHTS, global_batch=GB, micro_batch=GB, seed=1)
    b = MixtureSampler(SIZES, WEIGHTS, global_batch=GB, micro_batch=GB, seed=2)
    ga, gb = a.next_step()[0].tolist(), b.next_step()[0].tolist()
    assert [_source_of(i) for i in ga] == [_source_of(i) for i in gb] and ga != gb  # same mixture, own order
    again = MixtureSampler(SIZES, WEIGHTS, global_batch=GB, micro_batch=GB, seed=1)
    assert again.next_step()[0].tolist() == ga
    other = MixtureSampler(SIZES, [0.4, 0.3, 0.3], global_batch=GB, micro_batch=GB, seed=1)
    with pytest.raises(DataError, match="data.mix weights"):
        other.load_state_dict(a.state_dict())
    later = MixtureSampler(SIZES, WEIGHTS, global_batch=GB, micro_batch=GB, seed=1)
    later.seek(1)
    assert later.state_dict() == a.state_dict()


@pytest.mark.parametrize("sets,match", [
    (['data.mix={nosuch=1}'], r"data.mix: unknown source 'nosuch'; use 'bundled', a folder"),
    (['data.mix={bundled=0.5, "jsonl:x.jsonl"=0}'], r"data.mix: the weight of 'jsonl:x.jsonl' is 0; weights must be"),
    (['data.mix={bundled=-1}'], r"weights must be positive"),
    (['data.mix={"jsonl:a.jsonl"=1}', "data.source=megatron:/x"],
     r"data.source = 'megatron:/x' is not one of data.mix's sources \('jsonl:a.jsonl'\); set data.source = 'mix'"),
    (["data.source=mix"], r"data.source = 'mix' but data.mix is empty"),
])
def test_bad_mix_specs_name_the_field_and_the_fix(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/tiny.toml", sets)


def test_mix_keeps_a_config_files_source_and_round_trips():
    cfg = load_config("configs/tiny.toml", ['data.mix={bundled=0.7, "jsonl:x.jsonl"=0.3}'])
    assert cfg.data.source == "mix" and cfg.data.mix == {"bundled": 0.7, "jsonl:x.jsonl": 0.3}
    import tomllib

    from dist_train.config import build_config

    again = build_config(tomllib.loads(cfg.to_toml()))
    assert again.data == cfg.data


def test_bad_mix_on_the_command_line_is_one_line(tmp_path):
    proc = run_cli("train", "configs/tiny.toml", "--set", "data.mix={bundled=0}", "--set", f"run.dir={tmp_path}",
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.mix: the weight of 'bundled' is 0" in lines[0], proc.stderr


# ----------------------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def mix_runs(tmp_path_factory):
    """One 2-rank launch: a 2-source mix on dp_shard = 2 for 2 steps (checkpointed), continued to
    step 5 as tp = 2 (dp = 1), and the same 5 steps uninterrupted on dp_shard = 2."""
    root = tmp_path_factory.mktemp("mix")
    with open(root / "docs.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"document {i} " + "abc " * (i % 17)}) + "\n")
    mix = '{bundled = 0.7, "jsonl:%s" = 0.3}' % (root / "docs.jsonl")
    common = {"data.mix": mix, "data.verify": "off", "train.global_batch": 8, "checkpoint.every": 2,
              "train.steps": 2, "parallel.dp_shard": 2, **SGD}
    sweep(root, 2, {"a": {}, "a ": {"run.name": "a", "train.steps": 5, "parallel.tp": 2, "parallel.dp_shard": 1},
                    "straight": {"train.steps": 5}}, common)
    return root


def test_trainer_records_tokens_per_source_and_resumes_on_another_layout(mix_runs):
    from tests.equivalence import read_config

    cfg = read_config(mix_runs / "a")
    names = list(cfg.data.mix)
    records, straight = read_metrics(mix_runs / "a"), read_metrics(mix_runs / "straight")
    assert [r["step"] for r in records] == list(range(1, 6))
    assert (mix_runs / "a" / "config.before-step-000002.toml").exists()  # resumed at step 2 on tp = 2
    for r in records:
        by_source = r["tokens_by_source"]
        assert list(by_source) == names and sum(by_source.values()) == r["tokens"]
    # the resumed run's source counts continue the uninterrupted run's exactly
    assert [r["tokens_by_source"] for r in records] == [r["tokens_by_source"] for r in straight]
    # and its losses too: the same samples, steps 3..5 on another layout (tests/equivalence.py's bound)
    assert_values_match([r["loss"] for r in records], [r["loss"] for r in straight], 8 * 128, "resumed mix loss")
