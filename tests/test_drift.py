import pytest
import torch

from hcpolicy.drift import EveryN, Never, WindowedOverlap

U = 100


def sets(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def test_windowed_overlap_fires_on_median_below_tau():
    trig = WindowedOverlap(window=3, tau=0.5)
    trig.set_reference("p", sets([0, 1, 2, 3]))
    same, half, none = sets([0, 1, 2, 3]), sets([0, 1, 8, 9]), sets([7, 8, 9, 6])
    assert trig.observe("p", 0, same, U) is None
    assert trig.observe("p", 1, none, U) is None
    assert trig.observe("p", 2, none, U).tolist() == [True]  # median of 1, 0, 0 = 0 < .5
    # the reference is now the newest set ({6,7,8,9}); a window that overlaps it half does not fire
    for step in range(3, 5):
        assert trig.observe("p", step, half, U) is None
    assert trig.observe("p", 5, half, U).tolist() == [False]


def test_per_sequence_versus_batch_average():
    ref = sets([0, 1, 2, 3], [0, 1, 2, 3])
    drift = sets([0, 1, 2, 3], [6, 7, 8, 9])  # sequence 0 stays, sequence 1 moves away
    per_seq = WindowedOverlap(window=1, tau=0.6, per_sequence=True)
    per_seq.set_reference("p", ref)
    assert per_seq.observe("p", 0, drift, U).tolist() == [False, True]
    averaged = WindowedOverlap(window=1, tau=0.6, per_sequence=False)
    averaged.set_reference("p", ref)
    assert averaged.observe("p", 0, drift, U).tolist() == [True, True]  # mean overlap .5 < .6


def test_unknown_monitor_and_validation():
    with pytest.raises(KeyError, match="no reference"):
        WindowedOverlap().observe("x", 0, sets([1]), U)
    with pytest.raises(ValueError):
        WindowedOverlap(window=0)
    with pytest.raises(ValueError):
        WindowedOverlap(tau=1.5)


def test_every_n_and_never():
    t = EveryN(n=3)
    fired = [t.observe("p", s, sets([1], [2]), U) for s in range(6)]
    assert [f is not None for f in fired] == [False, False, True, False, False, True]
    assert fired[2].tolist() == [True, True]
    assert all(Never().observe("p", s, sets([1]), U) is None for s in range(4))


@pytest.mark.parametrize("per_sequence", [True, False])
def test_observe_window_equals_step_by_step(per_sequence):
    """The batched window path decides and moves the reference exactly as W single steps do."""
    gen = torch.Generator().manual_seed(3)
    universe, k, batch, window = 50, 12, 4, 5
    one = WindowedOverlap(window=window, per_sequence=per_sequence)
    many = WindowedOverlap(window=window, per_sequence=per_sequence)
    reference = torch.stack([torch.randperm(universe, generator=gen)[:k] for _ in range(batch)])
    for t in (one, many):
        t.set_reference("m", reference)
    for round_ in range(4):
        # half the sequences keep most of the reference, half move away: some fire, some not
        sets = torch.stack([
            torch.stack([torch.randperm(universe, generator=gen)[:k] if b % 2 else reference[b] for b in range(batch)])
            for _ in range(window)
        ], dim=1)  # [B, W, k]
        stepwise = [one.observe("m", round_ * window + w, sets[:, w], universe) for w in range(window)]
        assert all(s is None for s in stepwise[:-1])
        batched = many.observe_window("m", round_ * window, sets, universe)
        assert torch.equal(batched, stepwise[-1])
        assert torch.equal(many._reference["m"], one._reference["m"])
    if per_sequence:  # the moving sequences fired: the test exercised both outcomes
        assert bool(stepwise[-1].any()) and not bool(stepwise[-1].all())


def test_observe_window_default_loops_observe():
    """A trigger that only implements ``observe`` gets the OR over the window."""
    trigger = EveryN(n=2)
    sets = torch.zeros(3, 4, 5, dtype=torch.int64)
    assert torch.equal(trigger.observe_window("m", 0, sets, 10), torch.ones(3, dtype=torch.bool))
    assert trigger.observe_window("m", 0, sets[:, :1], 10) is None


@pytest.mark.parametrize("per_sequence", [True, False])
def test_observe_windows_equals_one_monitor_at_a_time(per_sequence):
    """Several monitors' windows in one call decide and move references as one call each."""
    gen = torch.Generator().manual_seed(5)
    universe, k, batch, window, monitors = 40, 10, 3, 5, 4
    one = WindowedOverlap(window=window, per_sequence=per_sequence)
    many = WindowedOverlap(window=window, per_sequence=per_sequence)
    keys = [("layer", i) for i in range(monitors)]
    for key in keys:
        reference = torch.stack([torch.randperm(universe, generator=gen)[:k] for _ in range(batch)])
        one.set_reference(key, reference)
        many.set_reference(key, reference)
    outcomes = set()
    for round_ in range(3):
        sets = torch.stack([
            torch.stack([
                torch.stack([torch.randperm(universe, generator=gen)[:k] if (m + b) % 2 else one._reference[keys[m]][b]
                             for _ in range(window)])
                for b in range(batch)
            ])
            for m in range(monitors)
        ])  # [P, B, W, k]
        expected = torch.stack([one.observe_window(key, round_ * window, sets[m], universe) for m, key in enumerate(keys)])
        got = many.observe_windows(keys, round_ * window, sets, universe)
        assert torch.equal(got, expected)
        outcomes |= set(got.flatten().tolist())
        for key in keys:
            assert torch.equal(many._reference[key], one._reference[key])
    assert outcomes == {True, False}  # both decisions were exercised
    with pytest.raises(KeyError, match="no reference"):
        many.observe_windows([("layer", 99)], 0, sets[:1], universe)


def test_observe_windows_default_loops_observe_window():
    trigger = EveryN(n=2)
    sets = torch.zeros(2, 3, 4, 5, dtype=torch.int64)
    assert torch.equal(trigger.observe_windows(["a", "b"], 0, sets, 10), torch.ones(2, 3, dtype=torch.bool))
    assert not trigger.observe_windows(["a", "b"], 0, sets[:, :, :1], 10).any()  # no decision point
