"""Fresh worker processes of the benchmarks (``alignlib.bench.workers``): results, failures, several at once."""
import pytest

from alignlib.bench.workers import Job, WorkerError, run_worker, run_workers

pytestmark = pytest.mark.unit


def test_a_worker_returns_its_result_and_sees_its_environment():
    assert run_worker("math:sqrt", 6.25) == 2.5
    assert run_worker("os:getenv", "ALIGNLIB_WORKER_TEST", env={"ALIGNLIB_WORKER_TEST": "yes"}) == "yes"


def test_a_failing_worker_is_named_with_its_exit_code_and_last_stderr_lines():
    with pytest.raises(WorkerError, match="(?s)the worker root of -1 failed with exit code 1.*math domain error"):
        run_worker("math:sqrt", -1, name="root of -1")


def test_several_workers_at_once_and_a_failure_returned_not_raised():
    assert run_workers([Job("math:sqrt", 4.0), Job("math:factorial", 5)]) == [2.0, 120]
    (outcome,) = run_workers([Job("math:sqrt", -1.0, name="bad")])
    assert isinstance(outcome, WorkerError) and outcome.returncode == 1
