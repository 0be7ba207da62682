"""Which requests' outputs the engine process makes and sends at each step (`HandOver`)."""
import time

from nanovllm.outputs import RequestOutput


class HandOver:
    """Whose outputs the engine makes at each step. Every output costs the engine its making
    (detokenizing) and pickling, and the front tens of microseconds (waking its consumer, an
    HTTP chunk), so each request gets one every `interval_per_request` x live requests: a
    lone request every step, 256 requests about ten a second. In between, the engine makes
    only first and final outputs (time to first token, to finish); the others wait and then
    cover every step since (DELTA: all the new tokens and text). The hand-overs are spread over
    the steps: with K steps per interval, each step takes the next 1/K of the requests in
    turn, so no step makes them all at once (on the H100 machine's slower CPU such a step
    outlasted the GPU's).
    Only a request's first output carries the prompt (its ids can be thousands of integers
    to pickle); the front's RequestStream puts it back into the later ones."""

    def __init__(self, interval_per_request: float):
        self.interval_per_request = interval_per_request
        self.step_seconds = 0.0                 # a running average of the time between steps
        self.last_time = None
        self.started: dict[str, None] = {}      # requests whose first output was sent, in order
        self.cursor = 0                         # where the next step's turn starts in `started`
        self.credit = 0.0                       # requests owed an output (fractions carry over)
        self.unreported: dict[str, object] = {}    # engine Requests advanced since their last output

    def step(self, engine) -> list[RequestOutput]:
        """One engine step; the outputs to send now: every advanced request's first and final
        one, the others' when their turn comes."""
        wanted = self.wanted(engine.get_num_unfinished_requests())
        for request in engine.advance():
            self.unreported[request.request_id] = request
        if wanted is None:
            due, self.unreported = list(self.unreported.values()), {}
        else:
            due = [r for r in self.unreported.values() if r.finished or not r.reported or wanted(r.request_id)]
            for request in due:
                del self.unreported[request.request_id]
        return [out for out in map(engine.make_output, due) if out is not None]

    def wanted(self, num_requests: int, now: float | None = None):
        """None (every output now) or which requests' outputs to make."""
        now = time.perf_counter() if now is None else now
        if self.last_time is not None:
            gap = now - self.last_time
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * gap if self.step_seconds else gap
        self.last_time = now
        steps = int(self.interval_per_request * num_requests / self.step_seconds) if self.step_seconds else 1
        if steps <= 1 or not self.started:
            return None
        keys = list(self.started)
        self.credit = min(self.credit + len(keys) / steps, len(keys))   # a K-th of them per step
        share = int(self.credit)
        self.credit -= share
        start = self.cursor % len(keys)
        turn = set(keys[start:start + share] + keys[:max(0, start + share - len(keys))])
        self.cursor = start + share
        return turn.__contains__

    def items(self, outputs: list[RequestOutput]) -> list[tuple[str, RequestOutput, bool]]:
        """The (request_id, output, last) items to send for a step's outputs."""
        for output in outputs:
            if output.request_id in self.started:
                output.prompt = output.prompt_token_ids = output.prompt_logprobs = None
            else:
                self.started[output.request_id] = None
            if output.finished:
                self.drop(output.request_id)
        return [(output.request_id, output, output.finished) for output in outputs]

    def drop(self, request_id: str) -> None:
        self.started.pop(request_id, None)
        self.unreported.pop(request_id, None)
