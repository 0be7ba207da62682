"""The engine with speculative decoding: LLMEngine, whose step first has the Speculator propose
tokens for the running sequences and then verifies them in one forward pass (verify.py)."""
from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import LLMEngine, Request
from nanovllm.outputs import RequestOutput
from nanovllm.spec_decode.scheduler import SpeculativeScheduler
from nanovllm.spec_decode.speculator import Speculator


class SpeculativeEngine(LLMEngine):
    scheduler_class = SpeculativeScheduler

    def __init__(self, config: EngineConfig):
        # Built before the target's runner: a draft model's memory is then already taken when
        # the target sizes its KV cache.
        self.speculator = Speculator(config)
        super().__init__(config)

    def advance(self) -> list[Request]:
        """One step. A speculative one is read back before the next is scheduled (no overlap:
        the next proposals need its tokens on the host). Where there is nothing to propose, the
        steps run plain and overlapped, as LLMEngine's, until the tokens read back give a
        proposal again (the n-gram search is cheap enough to ask after every step); so do all
        steps with more running requests than disable_by_batch_size."""
        if not self.speculating():
            return super().advance()
        if self.in_flight is not None and not self.speculator.expects_proposals(self.scheduler.running):
            return super().advance()
        advanced = self._finish(self.in_flight) if self.in_flight is not None else []
        self.in_flight = None             # the plain step in flight is read back first
        self.speculator.propose(self.scheduler.running, self.eos_ids)
        if not any(seq.spec_token_ids for seq in self.scheduler.running):
            return advanced + super().advance()       # a plain step, left in flight
        batch = self.scheduler.schedule()
        if batch is None:
            return advanced
        self.num_steps, self.last_step = self.num_steps + 1, batch
        verified = self.speculator.run(self.runner, batch, self.eos_ids)
        more = self.speculator.finish(verified, self.scheduler, self._process)
        return list({r.request_id: r for r in advanced + more}.values())

    def speculating(self) -> bool:
        limit = self.config.speculative_config.disable_by_batch_size
        return limit is None or len(self.scheduler.running) <= limit

    def make_output(self, request: Request) -> RequestOutput | None:
        """With the request's proposed and accepted token counts as its `metrics`."""
        output = super().make_output(request)
        if output is not None:
            output.metrics = self.speculator.request_metrics(request.seqs)
        return output
