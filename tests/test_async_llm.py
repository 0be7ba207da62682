"""AsyncLLM: streaming outputs, concurrent requests batched together, errors, aborts, shutdown."""
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import nanovllm
from nanovllm import LLM, RequestOutputKind, SamplingParams
from nanovllm.entrypoints.async_llm import AsyncLLM, EngineDeadError
from tests.conftest import wait_gone, wait_idle

ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks_override=256)
PROMPTS = ["Hello, my name is", "The capital of France is", "Paged attention keeps", "List all prime numbers"]


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    engine = AsyncLLM(tiny_qwen3, **ENGINE_KWARGS)
    yield engine
    engine.shutdown_sync()


@pytest.fixture(scope="module")
def reference(tiny_qwen3) -> list[str]:
    llm = LLM(tiny_qwen3, **ENGINE_KWARGS)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_cumulative_stream_matches_llm_generate(engine, reference):
    outs = run(collect(engine, PROMPTS[0], greedy(), "cumulative"))
    counts = [len(o.outputs[0].token_ids) for o in outs]
    assert len(outs) > 1 and counts == sorted(set(counts)) and counts[-1] == 12     # token by token
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].text == reference[0]
    assert outs[-1].request_id == "cumulative"


def test_delta_outputs_concatenate(engine, reference):
    params = greedy(output_kind=RequestOutputKind.DELTA)
    outs = run(collect(engine, PROMPTS[1], params, "delta"))
    assert "".join(o.outputs[0].text for o in outs) == reference[1]
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 12
    final = run(collect(engine, PROMPTS[1], greedy(output_kind=RequestOutputKind.FINAL_ONLY), "final"))
    assert len(final) == 1 and final[0].outputs[0].text == reference[1]


def test_every_output_carries_the_prompt(engine):
    """The engine sends the prompt with a request's first output only; the stream restores it."""
    for kind in (RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE):
        outs = run(collect(engine, PROMPTS[0], greedy(prompt_logprobs=2, output_kind=kind), f"prompted-{kind.name}"))
        first = outs[0]
        assert len(outs) > 2 and first.prompt == PROMPTS[0] and len(first.prompt_token_ids) > 1
        assert len(first.prompt_logprobs) == len(first.prompt_token_ids) and first.prompt_logprobs[1]
        for out in outs[1:]:
            assert (out.prompt, out.prompt_token_ids, out.prompt_logprobs) == (
                first.prompt, first.prompt_token_ids, first.prompt_logprobs)


def test_a_slow_consumer_gets_folded_outputs(engine, reference):
    """Outputs that pile up while the consumer is busy arrive folded into one."""
    async def slow(kind):
        outs = []
        async for out in engine.generate(PROMPTS[3], greedy(output_kind=kind), f"slow-{kind.name}"):
            outs.append(out)
            time.sleep(0.05)        # blocks the event loop: several steps pile up meanwhile
        return outs
    delta = run(slow(RequestOutputKind.DELTA))
    assert len(delta) < 12 and delta[-1].finished
    assert "".join(o.outputs[0].text for o in delta) == reference[3]
    assert sum(len(o.outputs[0].token_ids) for o in delta) == 12
    cumulative = run(slow(RequestOutputKind.CUMULATIVE))
    assert len(cumulative) < 12 and cumulative[-1].outputs[0].text == reference[3]


def test_outputs_held_between_hand_overs_are_folded(tiny_qwen3, reference):
    """With a long hand-over interval, the first output comes at once, the rest folded into the last."""
    engine = AsyncLLM(tiny_qwen3, stream_interval_per_request=10.0, **ENGINE_KWARGS)
    try:
        outs = run(collect(engine, PROMPTS[3], greedy(output_kind=RequestOutputKind.DELTA), "held"))
    finally:
        engine.shutdown_sync()
    assert 2 <= len(outs) <= 3 and outs[-1].finished
    assert len(outs[0].outputs[0].token_ids) == 1      # the first token is not held back
    assert "".join(o.outputs[0].text for o in outs) == reference[3]
    assert sum(len(o.outputs[0].token_ids) for o in outs) == 12


def test_concurrent_requests_share_batches(engine, reference):
    async def main():
        start = engine.stats().num_steps
        tasks = [collect(engine, PROMPTS[i % 4], greedy(), f"c{i}") for i in range(16)]
        results = await asyncio.gather(*tasks)
        return results, engine.stats().num_steps - start
    results, steps = run(main())
    assert [r[-1].outputs[0].text for r in results] == [reference[i % 4] for i in range(16)]
    assert steps < 16 * 12 / 4      # 192 tokens in a few dozen steps: they ran together


def test_a_request_joins_the_running_batch(engine, reference):
    """A request added while another decodes joins its batch: it ends long before the running
    one, in about as many steps as it has tokens (the count includes the steps that ran while
    the commands and outputs crossed the pipe)."""
    async def main():
        long = await engine.add_request("long", PROMPTS[0], greedy(200, ignore_eos=True))
        await long.__anext__()                      # it is decoding now
        start = engine.stats().num_steps
        late = await collect(engine, PROMPTS[1], greedy(), "late")
        steps = engine.stats().num_steps - start
        long_was_running = engine.stats().num_unfinished_requests == 1
        rest = [out async for out in long]
        return late, steps, long_was_running, rest
    late, steps, long_was_running, rest = run(main())
    assert late[-1].outputs[0].text == reference[1]
    assert long_was_running and len(rest[-1].outputs[0].token_ids) == 200
    assert steps < 60, f"{steps} steps for 12 tokens: the late request waited for the running one"


def test_bad_request_raises_and_leaves_others_running(engine, reference):
    async def main():
        good = asyncio.create_task(collect(engine, PROMPTS[2], greedy(), "good"))
        with pytest.raises(ValueError, match="longer than the maximum model length"):
            await collect(engine, [5] * 300, greedy(), "too-long")
        with pytest.raises(ValueError, match="temperature"):
            await collect(engine, "hi", SamplingParams(temperature=-1), "bad-temperature")
        with pytest.raises(ValueError, match="out of vocabulary"):
            await collect(engine, [1, 2, 100000], greedy(), "bad-id")
        with pytest.raises(TypeError, match="request_id"):
            await collect(engine, "hi", greedy(), 7)
        return await good
    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].text == reference[2]


def test_duplicate_request_id_is_refused(engine):
    async def main():
        params = greedy(200, ignore_eos=True)
        stream = await engine.add_request("dup", PROMPTS[0], params)
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("dup", PROMPTS[0], params)
        stream.close()
    start = engine.stats().num_steps
    run(main())
    assert wait_idle(engine).num_steps - start < 200


def test_leaving_the_loop_early_aborts_and_frees_blocks(engine):
    async def main():
        got = 0
        async for out in engine.generate(PROMPTS[0], greedy(200, ignore_eos=True), "leaver"):
            got += 1
            if got == 3:
                stats = engine.stats()
                assert stats.num_free_blocks < stats.num_blocks
                break
    start = engine.stats().num_steps
    run(main())
    stats = wait_idle(engine)
    assert stats.num_steps - start < 200, "the request ran to its end instead of being aborted"
    assert stats.num_free_blocks == stats.num_blocks


def test_cancelled_consumer_aborts(engine):
    async def main():
        task = asyncio.create_task(collect(engine, PROMPTS[1], greedy(200, ignore_eos=True), "cancelled"))
        while not engine.stats().num_unfinished_requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    start = engine.stats().num_steps
    run(main())
    stats = wait_idle(engine)
    assert stats.num_steps - start < 200, "the request ran to its end instead of being aborted"
    assert stats.num_free_blocks == stats.num_blocks


def test_abort_ends_the_stream(engine):
    async def main():
        outs = []
        async for out in engine.generate(PROMPTS[2], greedy(200, ignore_eos=True), "aborted"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("aborted")
        return outs
    start = engine.stats().num_steps
    outs = run(main())
    assert 2 <= len(outs) < 200 and not outs[-1].finished
    assert wait_idle(engine).num_steps - start < 200


def test_idle_loop_sleeps(engine):
    """With nothing to do, the engine's loop blocks on its pipe instead of polling: it turns
    once per command (here: the stats request), not in between."""
    before = wait_idle(engine).loop_iterations
    time.sleep(0.3)
    assert engine.stats().loop_iterations == before + 1
    time.sleep(0.3)
    assert engine.stats().loop_iterations == before + 2


def test_shutdown_fails_pending_requests(tiny_qwen3):
    engine = AsyncLLM(tiny_qwen3, **ENGINE_KWARGS)

    async def main():
        stream = await engine.add_request("pending", PROMPTS[0], greedy(200, ignore_eos=True))
        await anext(stream)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], greedy(), "after")
    stopped = []
    engine.on_stopped(stopped.append)
    run(main())
    assert not engine.is_running
    assert stopped == [None] and engine.error is None       # a shutdown is no failure


def test_request_ids_are_free_again_at_once(engine, reference):
    """An id can be reused right after its stream ended, was left or was aborted (a late
    reply from the engine about the old request never reaches the new one)."""
    async def main():
        await collect(engine, PROMPTS[0], greedy(), "again")
        await engine.abort("again")                      # finished already: nothing to do
        assert (await collect(engine, PROMPTS[0], greedy(), "again"))[-1].outputs[0].text == reference[0]
        async with contextlib.aclosing(engine.generate(PROMPTS[1], greedy(200, ignore_eos=True), "again")) as gen:
            async for _ in gen:
                break                                    # left early (and closed at once): aborted
        outs = await collect(engine, PROMPTS[1], greedy(), "again")
        assert outs[-1].outputs[0].text == reference[1] and outs[-1].request_id == "again"
        stream = await engine.add_request("again", PROMPTS[2], greedy(200, ignore_eos=True))
        await engine.abort(["again", 7, ["not", "an", "id"]])     # odd ids are ignored
        assert all(not o.finished for o in [o async for o in stream])   # ended by the abort
        return await collect(engine, PROMPTS[2], greedy(), "again")
    assert run(main())[-1].outputs[0].text == reference[2]
    assert wait_idle(engine).num_free_blocks == engine.stats().num_blocks


def test_a_prompt_that_cannot_be_sent_is_refused(engine, reference):
    async def main():
        with pytest.raises(ValueError, match="cannot be sent"):
            await engine.add_request("unsendable", (i for i in range(3)), greedy())
        return await collect(engine, PROMPTS[0], greedy(), "unsendable")     # the channel still works
    assert run(main())[-1].outputs[0].text == reference[0]


def test_ctrl_c_is_the_fronts_even_when_built_off_the_main_thread(tiny_qwen3, reference):
    built = []
    thread = threading.Thread(target=lambda: built.append(AsyncLLM(tiny_qwen3, **ENGINE_KWARGS)))
    thread.start()
    thread.join()
    engine = built[0]
    try:
        os.kill(engine._process.proc.pid, signal.SIGINT)     # a terminal's Ctrl-C reaches the whole group
        time.sleep(0.5)
        assert run(collect(engine, PROMPTS[0], greedy(), "after-ctrl-c"))[-1].outputs[0].text == reference[0]
    finally:
        engine.shutdown_sync()


def test_a_killed_engine_process_fails_its_requests(tiny_qwen3):
    engine = AsyncLLM(tiny_qwen3, **ENGINE_KWARGS)
    stopped = []
    engine.on_stopped(stopped.append)

    async def main():
        stream = await engine.add_request("doomed", PROMPTS[0], greedy(200, ignore_eos=True))
        await anext(stream)
        engine._process.proc.kill()
        with pytest.raises(EngineDeadError, match=r"exited unexpectedly \(killed by signal 9\)$"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], greedy(), "after")
    try:
        run(main())
        assert not engine.is_running
        assert stopped == [engine.error] and "killed by signal 9" in engine.error
        late = []
        engine.on_stopped(late.append)                  # once stopped: called at once
        assert late == [engine.error]
    finally:
        engine.shutdown_sync()


def test_a_bad_model_fails_at_start_with_the_engines_error():
    with pytest.raises(OSError, match="does not exist"):     # what LLM(...) raises
        AsyncLLM("/nonexistent/model", device="cpu")


_FRONT = textwrap.dedent("""
    import sys, time
    from nanovllm.entrypoints.async_llm import AsyncLLM

    if __name__ == "__main__":
        engine = AsyncLLM(sys.argv[1], device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks_override=64)
        print(engine._process.proc.pid, flush=True)
        if sys.argv[2] == "wait":
            time.sleep(120)
        # else: leave without shutdown(); interpreter exit must stop the engine process
""")


@pytest.mark.slow
def test_the_engine_process_ends_with_its_front(tiny_qwen3, tmp_path):
    """Killed outright, or leaving without shutdown(): either way no engine process is left."""
    script = tmp_path / "front.py"
    script.write_text(_FRONT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(nanovllm.__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    fronts = {how: subprocess.Popen([sys.executable, str(script), tiny_qwen3, how], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env) for how in ("wait", "exit")}
    try:
        pids = {how: int(front.stdout.readline() or 0) for how, front in fronts.items()}
        assert all(pids.values()), fronts["wait"].stderr.read() + fronts["exit"].stderr.read()
        fronts["wait"].kill()
        assert fronts["exit"].wait(timeout=60) == 0
        assert wait_gone(list(pids.values()), 20) == [], "an engine process outlived its front"
    finally:
        for front in fronts.values():
            front.kill()
            front.wait()


def test_hand_overs_are_spread_over_the_steps():
    """Each request's output is wanted once every K steps (K = steps per interval), a K-th
    of them at each step, also while K changes (requests finish, steps speed up)."""
    from nanovllm.entrypoints.hand_over import HandOver
    hand_over = HandOver(interval_per_request=1e-3)
    keys = [f"r{i}#{i}" for i in range(120)]
    hand_over.started = dict.fromkeys(keys)                 # their first outputs went out
    last, gaps, per_step, now = {}, [], [], 0.0
    for step in range(400):
        if step == 200:
            for k in keys[60:]:                             # half of them finish: K 12 -> 6
                hand_over.drop(k)
        live = list(hand_over.started)
        now += 0.010 if step < 300 else 0.005               # then steps get faster: K back to 12
        want = hand_over.wanted(len(live), now)
        assert want is not None or step == 0                # (no step time known yet: every output)
        wanted = [k for k in live if want is None or want(k)]
        per_step.append(len(wanted))
        for k in wanted:
            if k in last and step >= 20:                   # (after the first full turn)
                gaps.append(step - last[k])
            last[k] = step
    lone = HandOver(interval_per_request=1e-3)
    lone.started = {"only#0": None}
    assert all(lone.wanted(1, 0.01 * t) is None for t in range(5))   # a lone request: every step's output
    assert max(per_step[1:]) <= 120 / 11 + 1                # spread: never all at once
    assert max(gaps) <= 13 and min(gaps) >= 5               # every K steps, K between 6 and 12
