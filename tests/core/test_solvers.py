"""Solvers: fixed points, trajectories, resumability, per-sample freezing, guards."""

from __future__ import annotations

import pytest
import torch

from deqguard.configs import SolverConfig
from deqguard.dynamics import cell_fn
from deqguard.models import build_model
from deqguard.solvers import Trajectory, make_solver
from tests._toys import linear_contraction

SOLVERS = ["broyden", "anderson", "picard"]


def _linear_fn(a, b):
    def fn(z, index):
        bb = b if index is None else b[index]
        return z @ a.T + bb

    return fn


@pytest.mark.parametrize("name", SOLVERS)
def test_reaches_fixed_point_of_contraction(name):
    a, b = linear_contraction(batch=5, dim=20, scale=0.6)
    direct = torch.linalg.solve(torch.eye(20, dtype=a.dtype) - a, b.T).T  # z = A z + b
    solver = make_solver(SolverConfig(name=name, max_steps=80, tol=1e-12, memory=30))
    state, traj = solver.solve(_linear_fn(a, b), torch.zeros_like(b))
    torch.testing.assert_close(state.best_z, direct, atol=1e-9, rtol=1e-9)
    assert len(traj) == 80


def test_broyden_needs_fewer_steps_than_plain_iteration_on_a_contraction():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 0.95, 30, dtype=torch.float64)) @ q.T
    b = torch.randn(3, 30, generator=g, dtype=torch.float64)
    fn = _linear_fn(a, b)
    res = {}
    for name in ("broyden", "picard"):
        state, _ = make_solver(SolverConfig(name=name, max_steps=15, tol=0)).solve(
            fn, torch.zeros_like(b), record=False
        )
        res[name] = state.residual.max().item()
    assert res["broyden"] < res["picard"] / 10


@pytest.fixture(scope="module")
def micro_problem():
    torch.manual_seed(0)
    model = build_model("micro").eval()
    from deqguard.data import load_test

    x = load_test(n=6).float_images()
    with torch.no_grad():
        injection = model.inject(x)
    return model, cell_fn(model, injection), model.zero_state(6, x.device, x.dtype)


def test_broyden_beats_plain_iteration_on_micro(micro_problem):
    _, fn, z0 = micro_problem
    res = {}
    with torch.no_grad():
        for name in ("broyden", "picard"):
            solver = make_solver(SolverConfig(name=name, max_steps=8, tol=0))
            state, _ = solver.solve(fn, z0, record=False)
            res[name] = state.best_residual.mean().item()
    assert res["broyden"] < res["picard"]


@pytest.mark.parametrize("name", SOLVERS)
def test_trajectory_holds_exactly_n_raw_iterates(name, micro_problem):
    _, fn, z0 = micro_problem
    solver = make_solver(SolverConfig(name=name, tol=0))
    with torch.no_grad():
        state, traj = solver.solve(fn, z0, steps=5)
        # Step one at a time and compare each recorded state with the raw iterate then.
        s2 = solver.init(fn, z0)
        iterates = []
        for _ in range(5):
            s2 = solver.advance(fn, s2, 1)
            iterates.append(s2.z)
    assert len(traj) == 5 and len(traj.residuals) == 5
    for recorded, raw in zip(traj.states, iterates, strict=True):
        torch.testing.assert_close(recorded, raw, rtol=0, atol=0)
    if name == "picard":  # plain iteration: z[t] = f^t(0)
        z = z0
        with torch.no_grad():
            for recorded in traj.states:
                z = fn(z, None)
                torch.testing.assert_close(recorded, z)
    assert (state.nfe == 6).all()  # k steps cost k + 1 evaluations


@pytest.mark.parametrize("name", SOLVERS)
def test_four_chunks_of_two_equal_one_run_of_eight(name, micro_problem):
    _, fn, z0 = micro_problem
    solver = make_solver(SolverConfig(name=name, max_steps=8, tol=0.3, memory=5))
    with torch.no_grad():
        single, traj1 = solver.solve(fn, z0)
        chunked = solver.init(fn, z0)
        traj2 = Trajectory()
        for _ in range(4):
            chunked = solver.advance(fn, chunked, 2, traj2)
    assert len(traj2) == 8
    for a_, b_ in zip(traj1.states, traj2.states, strict=True):
        torch.testing.assert_close(a_, b_, rtol=0, atol=0)
    torch.testing.assert_close(single.best_z, chunked.best_z, rtol=0, atol=0)
    assert torch.equal(single.nfe, chunked.nfe)


def test_converged_samples_are_frozen_and_cost_nothing():
    a, b = linear_contraction(batch=4, dim=10, scale=0.5)
    b[0] = 0.0  # sample 0 starts at its fixed point (z = 0) and converges at once
    b[1] *= 1e-3
    calls: list[int] = []

    def fn(z, index):
        calls.append(z.shape[0])
        bb = b if index is None else b[index]
        return z @ a.T + bb

    solver = make_solver(SolverConfig(name="broyden", max_steps=6, tol=1e-6, skip_fraction=1.0))
    state, traj = solver.solve(fn, torch.zeros_like(b))
    assert state.converged[0]
    for z in traj.states:  # frozen at its converged iterate
        assert torch.equal(z[0], traj.states[0][0])
    assert state.nfe[0] < state.nfe[2]
    assert min(calls) < 4  # later calls ran on a subset of the batch


def test_nan_guard_freezes_the_sample_and_keeps_the_rest():
    a, b = linear_contraction(batch=3, dim=8, scale=0.5)

    def fn(z, index):
        out = z @ a.T + (b if index is None else b[index])
        rows = torch.arange(3) if index is None else index
        out = out.clone()
        out[(rows == 1) & (z.abs().sum(1) > 0)] = float("nan")
        return out

    state, traj = make_solver(SolverConfig(name="broyden", max_steps=10, tol=1e-10)).solve(
        fn, torch.zeros_like(b)
    )
    assert state.diverged.tolist() == [False, True, False]
    assert torch.isfinite(state.best_z).all()
    assert state.residual[[0, 2]].max() < 1e-6


def test_retarget_continues_towards_the_new_fixed_point():
    a, b1 = linear_contraction(batch=4, dim=16, scale=0.6, seed=1)
    b2 = b1 + 1.0
    solver = make_solver(SolverConfig(name="broyden", max_steps=40, tol=1e-12, memory=20))
    state = solver.init(_linear_fn(a, b1), torch.zeros_like(b1))
    state = solver.advance(_linear_fn(a, b1), state, 5)
    which = torch.tensor([True, False, True, False])
    b_mixed = torch.where(which[:, None], b2, b1)
    state = solver.retarget(_linear_fn(a, b_mixed), state, which=which)
    state = solver.advance(_linear_fn(a, b_mixed), state, 40)
    direct = torch.linalg.solve(torch.eye(16, dtype=a.dtype) - a, b_mixed.T).T
    torch.testing.assert_close(state.best_z, direct, atol=1e-8, rtol=1e-8)


def test_broyden_retarget_forgets_exactly_the_retargeted_rows():
    """A retargeted row continues as a fresh solve from its iterate would; the other rows are
    untouched. Both reset paths: every row (the slot count restarts) and some rows (zeroed)."""
    a, b1 = linear_contraction(batch=4, dim=16, scale=0.6, seed=2)
    b2 = b1 + 0.5
    cfg = SolverConfig(name="broyden", max_steps=40, tol=0.0, memory=4)
    for which in (torch.ones(4, dtype=torch.bool), torch.tensor([True, False, True, False])):
        solver = make_solver(cfg)
        b_new = torch.where(which[:, None], b2, b1)
        state = solver.advance(_linear_fn(a, b1), solver.init(_linear_fn(a, b1), b1 * 0), 6)
        twin = solver.advance(_linear_fn(a, b1), solver.init(_linear_fn(a, b1), b1 * 0), 6)
        state = solver.retarget(_linear_fn(a, b_new), state, which=which)
        state = solver.advance(_linear_fn(a, b_new), state, 7)
        fresh = solver.advance(_linear_fn(a, b2), solver.init(_linear_fn(a, b2), twin.z), 7)
        kept = solver.advance(_linear_fn(a, b1), twin, 7)
        torch.testing.assert_close(state.z[which], fresh.z[which], atol=1e-12, rtol=0)
        torch.testing.assert_close(state.z[~which], kept.z[~which], atol=1e-12, rtol=0)


def test_broyden_never_reads_a_memory_slot_it_has_not_written():
    """The secant buffers start uninitialised: poisoning them with NaN after ``init`` changes
    nothing, through the buffer's wrap-around and a retarget of some rows (zeroed) and of all
    (the slot count restarts)."""
    a, b = linear_contraction(batch=4, dim=16, scale=0.6, seed=3)
    cfg = SolverConfig(name="broyden", max_steps=12, tol=0.0, memory=5)
    some = torch.tensor([True, False, True, False])
    runs = []
    for poison in (False, True):
        solver = make_solver(cfg)
        state = solver.init(_linear_fn(a, b), torch.zeros_like(b))
        if poison:
            state.memory["us"].fill_(float("nan"))
            state.memory["vts"].fill_(float("nan"))
        traj = Trajectory()
        state = solver.advance(_linear_fn(a, b), state, 7, traj)  # wraps the 5 slots
        state = solver.retarget(_linear_fn(a, b + 0.3), state, which=some)
        state = solver.advance(_linear_fn(a, b + 0.3), state, 3, traj)
        state = solver.retarget(_linear_fn(a, b - 0.2), state)
        if poison:  # the restarted count makes every slot unwritten again
            state.memory["us"].fill_(float("nan"))
            state.memory["vts"].fill_(float("nan"))
        state = solver.advance(_linear_fn(a, b - 0.2), state, 4, traj)
        runs.append(traj.stacked_states())
    assert bool(torch.isfinite(runs[1]).all())
    torch.testing.assert_close(runs[1], runs[0], atol=0, rtol=0)


def test_flat_state_is_required():
    with pytest.raises(ValueError, match="flat"):
        make_solver().init(lambda z, i: z, torch.zeros(2, 3, 4))


def test_solvers_converge_on_the_shipped_micro_model():
    """A trained micro model (the shipped default) contracts: residuals fall along the solve."""
    from deqguard.data import load_test
    from deqguard.store import default_store_root, list_entries, load_entry

    names = [m.name for m in list_entries(default_store_root()) if m.config.name == "micro"]
    if not names:
        pytest.skip("no shipped micro model in model_store/")
    model = load_entry(default_store_root(), names[0]).model
    x = load_test(n=16).float_images()
    with torch.no_grad():
        fn = cell_fn(model, model.inject(x))
        z0 = model.zero_state(16, x.device, x.dtype)
        for name in SOLVERS:
            solver = make_solver(SolverConfig(name=name, max_steps=30, tol=0, memory=30))
            state, traj = solver.solve(fn, z0)
            first = traj.residuals[0].median().item()
            assert state.best_residual.median().item() < 0.5 * first, name


@pytest.mark.parametrize("name", SOLVERS)
def test_select_rows_is_a_snapshot_and_merge_rows_puts_it_back(name):
    """A step redone from a snapshot of some rows, merged back, equals the batch step; the
    snapshot does not change when the batch state goes on (memory is updated in place)."""
    a, b = linear_contraction(batch=4, dim=10, scale=0.6, seed=3)
    fn = _linear_fn(a, b)
    solver = make_solver(SolverConfig(name=name, tol=0.0, memory=3))
    state = solver.advance(fn, solver.init(fn, torch.zeros_like(b)), 4)
    rows = torch.tensor([1, 3])
    snap = solver.select_rows(state, rows)
    kept = {k: v.clone() for k, v in snap.memory.items() if isinstance(v, torch.Tensor)}
    state = solver.advance(fn, state, 1)
    for k, v in kept.items():
        assert torch.equal(snap.memory[k], v), k
    sub_fn = _linear_fn(a, b[rows])
    redo = solver.advance(sub_fn, snap, 1)
    twin = solver.advance(fn, solver.advance(fn, solver.init(fn, torch.zeros_like(b)), 4), 1)
    merged = solver.merge_rows(state, rows, redo)
    torch.testing.assert_close(merged.z, twin.z, atol=1e-12, rtol=0)
    torch.testing.assert_close(merged.best_z, twin.best_z, atol=1e-12, rtol=0)
    assert torch.equal(merged.nfe[rows], twin.nfe[rows])
    nxt = solver.advance(fn, merged, 2)
    ref = solver.advance(fn, twin, 2)
    torch.testing.assert_close(nxt.z, ref.z, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["broyden", "anderson"])
def test_memory_counter_advances_when_every_sample_is_frozen(name):
    """The slot counter counts steps, not steps in which someone moved: a snapshot taken before
    an all-frozen step still merges back after a step that moved."""
    a, b = linear_contraction(batch=2, dim=6, scale=0.5, seed=4)
    fn = _linear_fn(a, b)
    solver = make_solver(SolverConfig(name=name, tol=1e30))  # frozen from the start
    state = solver.init(fn, torch.zeros_like(b))
    assert not bool(state.active.any())
    before = state.memory["count"]
    state = solver.advance(fn, state, 2)
    assert state.memory["count"] == before + 2
    with pytest.raises(ValueError, match="step"):
        solver.merge_rows(
            state, torch.tensor([0]), solver.select_rows(solver.init(fn, b), torch.tensor([0]))
        )
