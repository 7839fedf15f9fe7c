"""pipeline-tune's candidates and pruning rules (pipeline/tune/space.py), on the facts a tune measures."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.tune import space
from pipeline.tune.facts import Data, Facts, Machine
from pipeline.tune.space import Candidate


def facts(
    cores=2,
    export_mb=100.0,
    room_mb=24_000.0,
    load_ms=8.0,
    step_ms=20.0,
    decoded=False,
    augmented=False,
    sample_bytes=11_656,
    num_train=10_000,
) -> Facts:
    m = Machine("test CPU", cores, None, cores, room_mb, None, room_mb, "cpu")
    d = Data(
        storage="shards",
        fingerprint="f" * 16,
        export_mb=export_mb,
        num_train=num_train,
        sample_bytes=sample_bytes,
        stored_sample_bytes=sample_bytes / (3 if decoded else 1),
        decoded=decoded,
        augmented=augmented,
        fits_cache=export_mb * 1e6 <= room_mb * 2**20 / 2,
    )
    return Facts(m, d, load_ms=load_ms, step_ms=step_ms, batch_size=64)


DEFAULT = Candidate("shards", "mapped", 0, 0, 0)


def pruned_by(c: Candidate, f: Facts, default: Candidate = DEFAULT) -> str | None:
    """The name of the rule that prunes ``c`` (not the default), or None when it is kept."""
    kept, pruned = space.prune([c], f, default)
    assert kept[0] == default
    return next((rule for cand, rule, _why in pruned if cand == c), None)


def test_no_parallel_loading_when_loading_costs_nothing_next_to_the_step():
    f = facts(load_ms=0.05, step_ms=3.0)  # digits-like: 2% of a step
    for c in (
        Candidate("shards", "mapped", 2, 0, 0),
        Candidate("shards", "mapped", 0, 2, 0),
        Candidate("shards", "mapped", 0, 0, 2),
    ):
        assert pruned_by(c, f) == "parallel_loading_needs_load_time"
    why = space.parallel_loading_needs_load_time(Candidate("shards", "mapped", 1, 0, 0), f)
    assert "2% of a serial step" in why and "compete with training" in why


def test_no_workers_when_nothing_is_decode_or_model_bound():
    """Plain copies that take longer than the step: another process copies no faster."""
    c = Candidate("shards", "mapped", 1, 0, 0)
    assert pruned_by(c, facts(load_ms=30.0, step_ms=10.0)) == "workers_need_decode_or_model_work"
    # decode-bound (encoded) or augmented: workers may take that work over
    assert pruned_by(c, facts(load_ms=30.0, step_ms=10.0, decoded=True)) is None
    assert pruned_by(c, facts(load_ms=30.0, step_ms=10.0, augmented=True)) is None
    # model-bound: a worker loads while the step runs
    assert pruned_by(c, facts(load_ms=5.0, step_ms=20.0)) is None


def test_no_mapped_buffers_when_the_data_is_larger_than_memory():
    mapped, memory = Candidate("shards", "mapped", 0, 0, 0), Candidate("shards", "memory", 0, 0, 0)
    out_of_core = facts(export_mb=2_000.0, room_mb=800.0)
    assert not out_of_core.data.fits_cache
    serial_prefetch = Candidate("shards", "memory", 0, 0, 2)  # a default that is neither
    assert pruned_by(mapped, out_of_core, serial_prefetch) == "no_mapped_buffers_out_of_core"
    assert pruned_by(memory, out_of_core, serial_prefetch) is None
    cached = facts(export_mb=100.0, room_mb=800.0)
    assert pruned_by(memory, cached, serial_prefetch) == "no_memory_buffers_when_cached"
    assert pruned_by(mapped, cached, serial_prefetch) is None


def test_no_ram_when_the_split_does_not_fit():
    ram = Candidate("ram", None, 0, 0, 0)
    assert pruned_by(ram, facts(num_train=200_000, room_mb=800.0)) == "ram_only_when_it_fits"
    assert pruned_by(ram, facts(num_train=1_000, room_mb=800.0)) is None


def test_threads_and_workers_within_the_cores():
    f = facts(cores=2, decoded=True)
    assert pruned_by(Candidate("shards", "mapped", 2, 2, 0), f) == "threads_within_cores"
    assert pruned_by(Candidate("shards", "mapped", 4, 0, 0), f) == "threads_within_cores"
    assert pruned_by(Candidate("shards", "mapped", 0, 4, 0), f) == "threads_within_cores"
    assert pruned_by(Candidate("shards", "mapped", 1, 2, 0), f) is None
    one = facts(cores=1, decoded=True)
    assert pruned_by(Candidate("shards", "mapped", 1, 0, 0), one) == "parallel_needs_two_cores"
    assert pruned_by(Candidate("shards", "mapped", 0, 0, 2), one) is None  # a prefetch thread still overlaps


def test_one_way_to_run_ahead_and_threads_need_work():
    f = facts(decoded=True)
    assert pruned_by(Candidate("shards", "mapped", 1, 0, 2), f) == "one_way_to_run_ahead"
    cheap = facts(load_ms=0.4, step_ms=2.0)  # 17% of a step, but 0.4 ms a batch: nothing to split
    assert pruned_by(Candidate("shards", "mapped", 0, 2, 0), cheap) == "threads_need_work_to_share"


def test_rules_without_their_fact_prune_nothing_and_the_default_is_never_pruned():
    unmeasured = dataclasses.replace(facts(), load_ms=None, step_ms=None)
    for c in (Candidate("shards", "mapped", 1, 0, 0), Candidate("shards", "mapped", 0, 2, 0)):
        assert pruned_by(c, unmeasured) is None
    odd_default = Candidate("shards", "memory", 4, 4, 2)  # breaks every rule on 2 cores, cached data
    kept, pruned = space.prune([odd_default, DEFAULT], facts(load_ms=0.01), odd_default)
    assert kept[0] == odd_default and odd_default not in [c for c, _, _ in pruned]


def test_grid_and_order():
    f = facts(cores=2, decoded=True, augmented=True)
    grid = space.grid(None, f, ["encoded", "memmap"])
    assert {c.num_workers for c in grid} == {0, 1, 2} and {c.decode_threads for c in grid} == {0, 2}
    assert {c.buffers for c in grid if c.storage == "encoded"} == {"memory", "mapped"}
    assert {c.buffers for c in grid if c.storage == "memmap"} == {None}
    assert len(grid) == 2 * 3 * 2 * 2 + 3 * 2 * 2
    assert space.counts(16) == [0, 1, 2, 4, 8, 16] and space.counts(6) == [0, 1, 2, 4, 6]
    default = Candidate("encoded", "mapped", 0, 0, 0)
    kept, pruned = space.prune(grid, f, default)
    ordered = space.by_promise(kept, f, default)
    assert ordered[0] == default and set(ordered) == set(kept)
    assert len(kept) + len(pruned) == len(set(grid))
    predicted = [space.predicted_ms(c, f) for c in ordered[1:]]
    assert predicted == sorted(predicted)  # the most promising first
    assert space.predicted_ms(default, f) == pytest.approx(f.load_ms + f.step_ms)


def test_overrides_name_only_what_changes():
    default = Candidate("shards", "mapped", 0, 0, 0)
    assert default.overrides(default) == []
    assert Candidate("shards", "mapped", 2, 0, 0).overrides(default) == ["loader.num_workers=2"]
    assert Candidate("shards", "memory", 0, 2, 2).overrides(default) == [
        "storage.buffers=memory",
        "loader.decode_threads=2",
        "loader.thread_prefetch=2",
    ]
    assert Candidate("memmap", None, 0, 0, 0).overrides(default) == ["storage=memmap"]


def test_a_setting_that_reads_far_more_than_it_delivers_collapses():
    assert space.collapses(1.2) is None and space.collapses(None) is None
    assert "collapses out of core" in space.collapses(3.0)
