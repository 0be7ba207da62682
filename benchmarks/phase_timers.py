"""Wall-clock timers around the engine's phases (scheduling, inputs, launch, sampling set-up,
waiting for the device, processing, speculation's proposals), with none of a profiler's
overhead. Used by profile_step.py and spec_step_profile.py (--phases)."""
import collections
import contextlib
import time


def _phase_methods():
    from nanovllm.engine import model_runner
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.engine.model_runner import ModelRunner
    from nanovllm.engine.scheduler import Scheduler
    from nanovllm.spec_decode.speculator import Speculator
    return [(Scheduler, "schedule"), (ModelRunner, "prepare"), (model_runner, "inputs_from_device"),
            (ModelRunner, "execute"), (ModelRunner, "sample"), (ModelRunner, "wait_ready"),
            (ModelRunner, "resolve"), (Scheduler, "update"), (LLMEngine, "_process"),
            (Speculator, "propose"), (Speculator, "expects_proposals"), (Speculator, "finish")]


@contextlib.contextmanager
def timed_phases():
    """Within the block, each phase method adds its wall time to the yielded PhaseTimes."""
    times = PhaseTimes()
    originals = [(owner, name, getattr(owner, name)) for owner, name in _phase_methods()]

    def timer(key, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                times.seconds[key] += time.perf_counter() - start
                times.calls[key] += 1
        return timed
    for owner, name, method in originals:
        setattr(owner, name, timer(f"{getattr(owner, '__name__', owner).split('.')[-1]}.{name}", method))
    try:
        yield times
    finally:
        for owner, name, method in originals:
            setattr(owner, name, method)


class PhaseTimes:
    def __init__(self):
        self.seconds, self.calls = collections.defaultdict(float), collections.Counter()

    def print(self, steps: int) -> None:
        """Each phase's time per engine step, largest first. (resolve includes wait_ready.)"""
        for key, total in sorted(self.seconds.items(), key=lambda item: -item[1]):
            print(f"  {key:32} {self.calls[key]:6} calls, {1000 * total / steps:7.3f} ms a step")
