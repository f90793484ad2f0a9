"""VerifierWorker (plain) and VerifierPool (real Ray actors in separate processes).

- the math verifier gives the same verdicts inside Ray verifier actors as in the main process (no silent 0);
- a verifier that raises / hangs / kills its process / hangs holding the GIL is counted (error / timeout),
  the pool restarts actors as needed and keeps working;
- the code sandbox's adversarial cases do not take the pool down.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from actors.verifier import VerifierPool, VerifierWorker
from passk_rl.tasks import STATUSES, make_task

DATA = os.path.join(os.path.dirname(__file__), "data")
GSM_PARAMS = {"train_files": os.path.join(DATA, "gsm8k", "train.jsonl"),
              "test_files": os.path.join(DATA, "gsm8k", "test.jsonl")}
CODE_PARAMS = {"test_files": os.path.join(DATA, "code", "mbpp.jsonl"), "timeout_s": 5.0, "memory_mb": 512}
MATH_PARAMS = {"train_files": os.path.join(DATA, "math", "train.jsonl"),
               "test_files": os.path.join(DATA, "math", "test.jsonl")}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def _math_batch():
    task = make_task("math", **MATH_PARAMS)
    ps = task.prompts("train") + task.prompts("test")
    right = ["The answer is \\boxed{" + p.answer + "}." for p in ps]
    wrong = ["\\boxed{" + p.answer + "+1}" for p in ps]
    forms = ["\\boxed{0.5}", "\\boxed{\\sqrt{20}}", "\\boxed{\\{3,2\\}}"]  # other forms of the first three
    prompts = ps + ps + ps[:3] + ps[:2]
    comps = right + wrong + forms + ["no box at all", "\\boxed{"]
    return task, prompts, comps


# ------------------------------------------------------------------------------------- plain worker
def test_worker_counts_raises_and_hangs_without_ray():
    params = dict(inner="gsm8k", inner_params=GSM_PARAMS, raise_frac=0.3, hang_frac=0.2, hang_s=600.0, seed=3)
    faulty = make_task("faulty", **params)
    ps = faulty.prompts("train")
    pairs = [(p, f"#### {p.answer}") for p in ps] + [(p, f"#### {k}") for p in ps[:2] for k in range(6)]
    faults = [faulty.fault_for(p.id, c) for p, c in pairs]
    assert "raise" in faults and "hang" in faults and None in faults
    w = VerifierWorker("faulty", params, timeout_s=1.0)
    try:
        w.ready()
        verdicts = w.verify_batch([p for p, _ in pairs], [c for _, c in pairs])
        for (p, c), f, v in zip(pairs, faults, verdicts):
            if f == "raise":
                assert v.status == "error" and "injected" in v.detail
            elif f == "hang":
                assert v.status == "timeout" and "1s" in v.detail
            else:
                assert v.status == "ok" and v.reward == float(c == f"#### {p.answer}")
        counts = w.counts()
        assert counts["error"] == faults.count("raise") and counts["timeout"] == faults.count("hang")
        assert sum(counts.values()) == len(pairs)
        time.sleep(0.3)
        assert w.stuck_threads() == 0  # interrupt() ended the abandoned sleeps
    finally:
        w.close()


def test_worker_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown task"):
        VerifierWorker("no-such-task", {}, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierWorker("gsm8k", GSM_PARAMS, timeout_s=0)


# ------------------------------------------------------------------------------------- Ray pool
def test_math_same_verdicts_in_ray_actors_as_in_main_process(ray_cluster):
    """Main thread of this process, a second thread of this process, and Ray actors (where every check runs
    in the worker's helper thread, i.e. off the actor's main thread) give identical verdicts."""
    task, prompts, comps = _math_batch()
    try:
        local = [task.verify(p, c) for p, c in zip(prompts, comps)]
        in_thread = []
        t = threading.Thread(target=lambda: in_thread.extend(task.verify(p, c) for p, c in zip(prompts, comps)))
        t.start()
        t.join()
    finally:
        task.close()
    pool = VerifierPool("math", MATH_PARAMS, num_workers=2, timeout_s=20.0)
    try:
        remote = pool.verify(prompts, comps)
    finally:
        pool.shutdown()
    key = [(v.reward, v.status) for v in local]
    assert [(v.reward, v.status) for v in remote] == key
    assert [(v.reward, v.status) for v in in_thread] == key
    n = len(task.prompts("train") + task.prompts("test"))
    assert sum(v.reward for v in remote) == n + 3  # every right answer scored 1 (no silent zeros)
    assert [v.status for v in remote[-2:]] == ["wrong_format", "wrong_format"]
    assert pool.counts() == {"ok": len(prompts) - 2, "wrong_format": 2, "timeout": 0, "error": 0}


def test_pool_counts_raising_and_hanging_verifiers_and_keeps_going(ray_cluster):
    params = dict(inner="gsm8k", inner_params=GSM_PARAMS, raise_frac=0.25, hang_frac=0.15, hang_s=600.0, seed=11)
    faulty = make_task("faulty", **params)
    ps = faulty.prompts("train") + faulty.prompts("test")
    prompts = ps * 2
    comps = [f"#### {p.answer}" if i % 3 else "#### 0" for i, p in enumerate(prompts)]
    faults = [faulty.fault_for(p.id, c) for p, c in zip(prompts, comps)]
    assert faults.count("raise") and faults.count("hang")
    pool = VerifierPool("faulty", params, num_workers=2, timeout_s=1.0)
    try:
        verdicts = pool.verify(prompts, comps)
        for p, c, f, v in zip(prompts, comps, faults, verdicts):
            expected = {"raise": "error", "hang": "timeout"}.get(f, "ok")
            assert v.status == expected, (p.id, c, f, v)
            if f is None:
                assert v.reward == float(c == f"#### {p.answer}")
        assert pool.last_counts()["error"] == faults.count("raise")
        assert pool.last_counts()["timeout"] == faults.count("hang")
        # the run continues: next batch is scored, counters accumulate
        ok_pairs = [(p, c) for p, c, f in zip(prompts, comps, faults) if f is None]
        again = pool.verify([p for p, _ in ok_pairs], [c for _, c in ok_pairs])
        assert all(v.status == "ok" for v in again)
        total = pool.counts()
        assert sum(total.values()) == len(prompts) + len(ok_pairs)
        assert set(total) == set(STATUSES)
        assert pool.restarts == 0  # sleeps end on interrupt(): no actor needed recycling
    finally:
        pool.shutdown()


def test_pool_restarts_dead_and_unresponsive_actors(ray_cluster):
    """A verifier that kills its process → that chunk is `error`; one that holds the GIL → `timeout` past the
    chunk deadline; both actors are replaced and later batches are scored normally."""
    # The inner task is the code sandbox (cheap to restart: no math-verify child to warm up).
    params = dict(inner="code", inner_params=CODE_PARAMS, crash_frac=0.3, hang_frac=0.3, hang_mode="gil", seed=5)
    faulty = make_task("faulty", **params)
    p = faulty.prompts("test")[0]
    crash_c = next(f"# {k}" for k in range(100) if faulty.fault_for(p.id, f"# {k}") == "crash")
    gil_c = next(f"# {k}" for k in range(100) if faulty.fault_for(p.id, f"# {k}") == "hang")
    pool = VerifierPool("faulty", params, num_workers=1, timeout_s=1.0, grace_s=3.0)
    try:
        v = pool.verify([p], [crash_c])
        assert v[0].status == "error" and "died" in v[0].detail
        assert pool.restarts == 1
        t0 = time.monotonic()
        v = pool.verify([p], [gil_c])
        assert v[0].status == "timeout" and "killed and restarted" in v[0].detail
        assert time.monotonic() - t0 < 60
        assert pool.restarts == 2
        # prompts whose pairs do not fault are scored by the fresh actor
        clean = [(q, q.meta["canonical_solution"]) for q in faulty.prompts("test") * 3 if
                 faulty.fault_for(q.id, q.meta["canonical_solution"]) is None]
        assert clean
        v = pool.verify([q for q, _ in clean], [c for _, c in clean])
        assert [(x.reward, x.status) for x in v] == [(1.0, "ok")] * len(clean)
        assert pool.counts()["error"] == 1 and pool.counts()["timeout"] == 1
        assert pool.stats()["live_workers"] == 1
    finally:
        pool.shutdown()


def test_pool_recycles_actor_with_stuck_verifier_thread(ray_cluster):
    """A hang that ignores interrupt() leaves a thread running after its timeout: the verdict is `timeout`,
    the other verdicts of the chunk are kept, and the actor is replaced."""
    params = dict(inner="code", inner_params=CODE_PARAMS, hang_frac=0.5, hang_s=120.0, honor_interrupt=False, seed=2)
    faulty = make_task("faulty", **params)
    ps = faulty.prompts("test")
    pairs = [(p, p.meta["canonical_solution"] + f"\n# {k}") for p in ps for k in range(4)]
    faults = [faulty.fault_for(p.id, c) for p, c in pairs]
    hang_i = faults.index("hang")
    clean = [i for i, f in enumerate(faults) if f is None][:2]
    pick = clean + [hang_i]
    pool = VerifierPool("faulty", params, num_workers=1, timeout_s=1.0, chunks_per_worker=1)
    try:
        v = pool.verify([pairs[i][0] for i in pick], [pairs[i][1] for i in pick])
        assert [(x.reward, x.status) for x in v] == [(1.0, "ok"), (1.0, "ok"), (0.0, "timeout")]
        assert pool.restarts == 1 and "still running" in pool.restart_reasons[0]
        v = pool.verify([pairs[i][0] for i in clean], [pairs[i][1] for i in clean])
        assert [(x.reward, x.status) for x in v] == [(1.0, "ok"), (1.0, "ok")]
    finally:
        pool.shutdown()


def test_code_sandbox_attacks_do_not_take_the_pool_down(ray_cluster):
    params = {"test_files": os.path.join(DATA, "code", "mbpp.jsonl"), "timeout_s": 2.0, "memory_mb": 512}
    task = make_task("code", **params)
    p = task.prompts("test")[0]  # sum_squares, 3 tests
    good = p.meta["canonical_solution"]
    attacks = {
        "loop": ("def sum_squares(xs):\n    while True:\n        pass\n", "timeout"),
        "alloc": ("x = bytearray(10**11)\n" + good, "error"),
        "socket": ("import socket\nsocket.create_connection(('127.0.0.1', 22))\n" + good, "ok"),
        "write": ("open('/tmp/passk-pool-escape', 'w').write('x')\n" + good, "ok"),
        "env": ("import os\nassert 'PASSK_POOL_SECRET' in os.environ\n" + good, "ok"),
        "fork": ("import os\nos.fork()\n" + good, "ok"),
        "exit": ("import os\nos._exit(0)\n" + good, "ok"),
        "syntax": ("def sum_squares(xs) return 0", "wrong_format"),
    }
    os.environ["PASSK_POOL_SECRET"] = "x"  # the actors inherit it; the sandbox must not
    pool = VerifierPool("code", params, num_workers=2, timeout_s=10.0)
    try:
        names = list(attacks)
        comps = [good] + [attacks[n][0] for n in names] + [good]
        verdicts = pool.verify([p] * len(comps), comps)
        assert (verdicts[0].reward, verdicts[0].status) == (1.0, "ok")
        assert (verdicts[-1].reward, verdicts[-1].status) == (1.0, "ok")
        for n, v in zip(names, verdicts[1:-1]):
            assert v.status == attacks[n][1], (n, v)
            assert v.reward == 0.0, (n, v)
        assert "memory limit" in verdicts[1 + names.index("alloc")].detail
        assert not os.path.exists("/tmp/passk-pool-escape")
        assert pool.restarts == 0
        again = pool.verify([p, p], [good, "def sum_squares(xs):\n    return 14\n"])
        assert [(v.reward, v.status) for v in again] == [(1.0, "ok"), (pytest.approx(1 / 3), "ok")]
    finally:
        os.environ.pop("PASSK_POOL_SECRET", None)
        pool.shutdown()


def test_pool_rejects_bad_arguments_before_starting_actors(ray_cluster):
    with pytest.raises(ValueError, match="unknown task"):
        VerifierPool("no-such-task", {}, num_workers=1, timeout_s=1.0)
    with pytest.raises(TypeError):
        VerifierPool("gsm8k", {"trian_files": "x"}, num_workers=1, timeout_s=1.0)
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool("gsm8k", GSM_PARAMS, num_workers=0, timeout_s=1.0)
    pool = VerifierPool("code", CODE_PARAMS, num_workers=1, timeout_s=5.0)
    try:
        assert pool.verify([], []) == []
        with pytest.raises(ValueError, match="completions"):
            pool.verify(make_task("code", **CODE_PARAMS).prompts("test")[:2], ["pass"])
    finally:
        pool.shutdown()
