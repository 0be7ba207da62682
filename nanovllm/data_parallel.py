"""DataParallelEngine: N engine replicas behind one engine's surface.

    llm = LLM(model, data_parallel_size=2)                                   # local processes
    llm = LLM(model, data_parallel_size=2, distributed_executor_backend="ray")  # Ray actors

`LLM.generate` drives an engine through add_request / has_full_step / step / abort_request /
has_unfinished_requests; this class has the same five, so generate, chat and the progress
bar are unchanged. Each replica is a whole LLMEngine (with its own tensor-parallel ranks)
in another process: a local one ("mp", nanovllm/replica_processes.py) or a Ray actor (nanovllm/ray.py).

The driver (this process) and a replica talk in rounds, one call in flight per replica:

    driver -> replica   run(adds, aborts, seconds)   the requests given and aborted since the last round
    replica -> driver   Round                        outputs made, requests refused, steps taken

A round applies the aborts and adds, then steps the engine for about ROUND_SECONDS (or
until it has nothing left, or FINISHED_GRACE_SECONDS after a request finished, so that a
finished request reaches the caller soon): a call's cost is spread over many steps, however
short they are. When a round comes back the next one is sent at once.

Balancing: a new request goes to the replica with the fewest expected tokens outstanding
(prompt + max_tokens per sequence); the prompt is tokenized here to count them.

Failures: a replica whose process or actor dies has its unfinished requests re-run on the
others (greedy outputs are unchanged: a request's tokens do not depend on its neighbours);
with none left the call raises, naming the replica. An engine that raises inside a live
replica is a bug, not a lost machine: the error is raised to the caller.
"""
import logging
import os
import time
import traceback
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.entrypoints.engine_process import sendable, summarize
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

ROUND_SECONDS = 0.1     # how long a replica steps before reporting back,
FINISHED_GRACE_SECONDS = 0.01    # or how soon after a request of the round finishes
# The arguments that configure the replicas as a group; each replica is a plain engine.
_GROUP_ARGS = ("data_parallel_size", "distributed_executor_backend")


@dataclass
class Round:
    """A replica's answer to run()."""
    outputs: list[RequestOutput]
    refused: list[tuple[str, BaseException]]     # (request_id, the engine's error) for adds it refused
    failure: tuple[str, str] | None              # (one line, traceback) if its engine raised
    num_steps: int


class ReplicaLost(Exception):
    """A replica's process or actor is gone (the transport failed, not the engine)."""


# -- inside a replica ------------------------------------------------------------------------
class ReplicaWorker:
    """Runs in the replica's process (or as the Ray actor): one LLMEngine, driven in rounds."""

    def __init__(self, model: str, engine_kwargs: dict, cpu_threads: int | None):
        import torch
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        from nanovllm.engine.llm_engine import LLMEngine
        self.engine = LLMEngine.from_kwargs(model, **engine_kwargs)
        self.cumulative: set[str] = set()    # requests whose outputs are CUMULATIVE

    def pid(self) -> int:
        return os.getpid()

    def run(self, adds: list, aborts: list[str], seconds: float = ROUND_SECONDS) -> Round:
        engine, refused = self.engine, []
        engine.abort_request(aborts)
        self.cumulative.difference_update(aborts)
        for request_id, prompt, params in adds:
            try:
                engine.add_request(request_id, prompt, params)
            except Exception as e:
                refused.append((request_id, sendable(e)))
            else:
                if params is None or params.output_kind == RequestOutputKind.CUMULATIVE:
                    self.cumulative.add(request_id)
        outputs, failure, steps_before = [], None, engine.num_steps
        deadline = time.monotonic() + seconds
        try:
            while engine.has_unfinished_requests():
                step_outputs = engine.step()
                outputs += step_outputs
                now = time.monotonic()
                if now >= deadline:
                    break
                if any(out.finished for out in step_outputs):     # report a finished request soon
                    deadline = min(deadline, now + FINISHED_GRACE_SECONDS)
        except Exception as e:
            failure = (summarize(e), traceback.format_exc())
        return Round(self._latest_cumulative(outputs), refused, failure, engine.num_steps - steps_before)

    def _latest_cumulative(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """A cumulative output holds all of its request's earlier ones: of a round's, only each
        request's last is sent (pickling every step's copy of every sequence costs more than
        the steps themselves on a fast device)."""
        last = {out.request_id: i for i, out in enumerate(outputs) if out.request_id in self.cumulative}
        for out in outputs:
            if out.finished:
                self.cumulative.discard(out.request_id)
        return [out for i, out in enumerate(outputs) if last.get(out.request_id, i) == i]

    def shutdown(self) -> None:
        self.engine.shutdown()


# -- the driver's handle on a replica ----------------------------------------------------------
class Replica:
    """One replica as the driver sees it: what it was given, and its transport (a subclass:
    ProcessReplica here, RayReplica in nanovllm/ray.py)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.pid: int | None = None
        self.request_ids: dict[str, None] = {}   # unfinished requests given to it, in order
        self.load = 0                            # their expected tokens
        self.adds: dict[str, tuple] = {}         # request_id -> (prompt, params), for its next round
        self.aborts: list[str] = []
        self.busy = False                        # a round is in flight
        self.num_finished = 0                    # requests it has completed (how the work was split)

    @property
    def name(self) -> str:
        return f"data-parallel replica {self.rank} (pid {self.pid})"

    def has_work(self) -> bool:
        return bool(self.request_ids or self.aborts)

    def submit(self, seconds: float) -> None:
        """Start a round with what is queued. Raises ReplicaLost."""
        adds = [(request_id, prompt, params) for request_id, (prompt, params) in self.adds.items()]
        aborts, self.adds, self.aborts = self.aborts, {}, []
        self.busy = True
        self._send(adds, aborts, seconds)

    # The transport, per backend:
    def _send(self, adds: list, aborts: list[str], seconds: float) -> None: raise NotImplementedError
    def receive(self) -> Round: raise NotImplementedError                  # raises ReplicaLost
    def shutdown(self) -> None: raise NotImplementedError

    @staticmethod
    def wait(replicas: list["Replica"]) -> list["Replica"]:
        """Block until some of the busy `replicas` have answered (or died); return those."""
        raise NotImplementedError


class DataParallelEngine:
    def __init__(self, config: EngineConfig, replicas: list[Replica]):
        self.config = config                     # the driver's view (tokenizer, max_model_len)
        self.tokenizer = load_tokenizer(config)
        self.replicas = replicas                 # the live ones
        self.owner: dict[str, Replica] = {}      # unfinished request -> the replica running it
        self.requests: dict[str, tuple] = {}     # request_id -> (prompt, params, cost), to re-run
        self.num_steps = 0                       # over all replicas
        self.round_seconds = ROUND_SECONDS

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "DataParallelEngine":
        backend = kwargs.get("distributed_executor_backend") or "mp"
        driver_kwargs = dict(kwargs)
        if backend == "ray" and kwargs.get("device") == "cuda":
            # The driver of a Ray cluster may have no GPU: it only tokenizes.
            import torch
            driver_kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        config = EngineConfig.from_kwargs(model, **driver_kwargs)
        replica_kwargs = {k: v for k, v in kwargs.items() if k not in _GROUP_ARGS}
        if backend == "ray":
            from nanovllm.ray import start_ray_replicas
            replicas = start_ray_replicas(model, replica_kwargs, config)
        else:
            from nanovllm.replica_processes import start_process_replicas
            replicas = start_process_replicas(model, replica_kwargs, config)
        return cls(config, replicas)

    # -- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> str:
        from nanovllm.engine.request_checks import check_request_args
        params = check_request_args(request_id, request_id in self.owner, params)
        if not self.replicas:
            raise RuntimeError("No data-parallel replica is left: every one has died (see the errors above).")
        prompt, num_prompt_tokens = self._tokenized(prompt)
        max_tokens = params.max_tokens
        if max_tokens is None:                   # the engine's default: up to max_model_len
            max_tokens = max(0, self.config.max_model_len - num_prompt_tokens)
        self.requests[request_id] = (prompt, params, num_prompt_tokens + params.n * max_tokens)
        self._assign(request_id)
        return request_id

    def _tokenized(self, prompt) -> tuple[object, int]:
        """The prompt with its token ids (tokenized once, here, to count them), and their number.
        A prompt of another shape goes on as it is; its replica's engine refuses it by name."""
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            return {"prompt": prompt, "prompt_token_ids": token_ids}, len(token_ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), (list, tuple)):
            return prompt, len(prompt["prompt_token_ids"])
        if isinstance(prompt, (list, tuple)):
            return prompt, len(prompt)
        return prompt, 0

    def _assign(self, request_id: str) -> None:
        """Give a request to the replica with the fewest expected tokens outstanding."""
        prompt, params, cost = self.requests[request_id]
        replica = min(self.replicas, key=lambda r: (r.load, r.rank))
        replica.adds[request_id] = (prompt, params)
        replica.request_ids[request_id] = None
        replica.load += cost
        self.owner[request_id] = replica

    def _forget(self, request_id: str) -> None:
        replica = self.owner.pop(request_id)
        del replica.request_ids[request_id]
        replica.load -= self.requests.pop(request_id)[2]

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            replica = self.owner.get(request_id)
            if replica is None:
                continue
            self._forget(request_id)
            if replica.adds.pop(request_id, None) is None:     # sent already: abort it there
                replica.aborts.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner)

    def has_full_step(self) -> bool:
        """False: generate adds every prompt before it steps (replicas run when step() sends them work)."""
        return False

    def get_num_unfinished_requests(self) -> int:
        return len(self.owner)

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Start a round on every idle replica with work, wait for some round to come back,
        and return its outputs."""
        for replica in list(self.replicas):
            if not replica.busy and replica.has_work():
                self._submit(replica)
        busy = [r for r in self.replicas if r.busy]
        if not busy:
            return []
        outputs, errors = [], []
        for replica in type(busy[0]).wait(busy):
            outputs += self._collect(replica, errors)
        if errors:
            raise errors[0]
        return outputs

    def _submit(self, replica: Replica) -> None:
        try:
            replica.submit(self.round_seconds)
        except ReplicaLost as lost:
            self._lose(replica, str(lost))

    def _collect(self, replica: Replica, errors: list) -> list[RequestOutput]:
        replica.busy = False
        try:
            answer = replica.receive()
        except ReplicaLost as lost:
            self._lose(replica, str(lost))
            return []
        self.num_steps += answer.num_steps
        if answer.failure is not None:
            summary, trace = answer.failure
            logger.error("%s failed:\n%s", replica.name, trace)
            for request_id in list(replica.request_ids):
                self._forget(request_id)
            self._retire(replica)
            errors.append(RuntimeError(f"{replica.name} failed: {summary}"))
            return []
        for request_id, error in answer.refused:
            if self.owner.get(request_id) is replica:
                self._forget(request_id)
                errors.append(error)
        # Outputs of requests aborted since the round began are dropped.
        outputs = [out for out in answer.outputs if self.owner.get(out.request_id) is replica]
        for out in outputs:
            if out.finished:
                self._forget(out.request_id)
                replica.num_finished += 1
        if replica.has_work():                   # the next round now: the replica need not wait for the caller
            self._submit(replica)
        return outputs

    def _lose(self, replica: Replica, why: str) -> None:
        """A replica died: give its unfinished requests to the others, in their order."""
        orphans = list(replica.request_ids)
        for request_id in orphans:
            del self.owner[request_id]
        self._retire(replica)
        if not self.replicas:
            for request_id in orphans:
                del self.requests[request_id]
            raise RuntimeError(f"{replica.name} died ({why}) and no replica is left to run its "
                               f"{len(orphans)} unfinished request(s).")
        logger.warning("%s died (%s); re-running its %d unfinished request(s) on the other %d replica(s)",
                       replica.name, why, len(orphans), len(self.replicas))
        for request_id in orphans:
            self._assign(request_id)

    def _retire(self, replica: Replica) -> None:
        self.replicas.remove(replica)
        replica.busy = False
        replica.request_ids, replica.adds, replica.aborts, replica.load = {}, {}, [], 0
        try:
            replica.shutdown()
        except Exception:                        # it is gone already; nothing to stop
            logger.debug("shutting down %s", replica.name, exc_info=True)

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()
        self.replicas = []
