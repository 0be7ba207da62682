"""nanovllm on Ray: data-parallel replicas as Ray actors, and `LLMPredictor` for Ray Data.

    LLM(model, data_parallel_size=4, distributed_executor_backend="ray")

    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    ds = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model": model}, concurrency=4,
                        num_gpus=1, batch_size=64)

Ray is optional (`pip install "nanovllm[ray]"`); docs/scale_out.md shows a cluster.
"""
import os

from nanovllm.config import EngineConfig
from nanovllm.data_parallel import Replica, ReplicaLost, ReplicaWorker, Round
from nanovllm.entrypoints.engine_process import summarize
from nanovllm.sampling_params import SamplingParams

# How long to wait for the cluster to find room for the replicas (an autoscaler may add nodes).
PLACEMENT_TIMEOUT_S = float(os.environ.get("NANOVLLM_RAY_PLACEMENT_TIMEOUT_S", 300))


def import_ray(needed_for: str):
    try:
        import ray
    except ImportError:
        raise ImportError(f'{needed_for} needs Ray, which is not installed: pip install "nanovllm[ray]"') from None
    return ray


# -- data-parallel replicas as actors ---------------------------------------------------------
def start_ray_replicas(model: str, engine_kwargs: dict, config: EngineConfig) -> list[Replica]:
    """N actors, each in its own placement-group bundle: on GPUs a bundle holds a replica's
    tensor_parallel_size GPUs (a bundle is on one node, so its ranks share the node); on
    CPUs, cores / N of the cluster's CPUs."""
    ray = import_ray('distributed_executor_backend="ray"')
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    if not ray.is_initialized():
        ray.init()      # Ray's convention: RAY_ADDRESS, else a cluster started here (`ray start`), else a new local one
    n, tp = config.data_parallel_size, config.tensor_parallel_size
    resources = ray.cluster_resources()
    device = engine_kwargs.get("device", "auto")
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
    if device == "cuda":
        threads, bundle = None, {"GPU": tp, "CPU": 1}
        if resources.get("GPU", 0) < n * tp:
            raise ValueError(f"data_parallel_size={n} with tensor_parallel_size={tp} needs {n * tp} GPUs; the "
                             f"Ray cluster has {resources.get('GPU', 0):g}.")
    else:
        largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        threads = int(min(resources.get("CPU", 0) // n, largest_node))
        if threads < 1:
            raise ValueError(f"data_parallel_size={n} needs a CPU per replica; the Ray cluster has "
                             f"{resources.get('CPU', 0):g}.")
        bundle = {"CPU": threads}
    placement = _Placement(ray, placement_group([bundle] * n, strategy="PACK"), n)
    try:
        ray.get(placement.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        placement.release_all()
        raise RuntimeError(f"The Ray cluster found no room for {n} replicas of {bundle} in {PLACEMENT_TIMEOUT_S:.0f} s "
                           f"(it has {resources}); NANOVLLM_RAY_PLACEMENT_TIMEOUT_S waits longer.") from None
    actor_class = ray.remote(ReplicaWorker)
    replicas = []
    for rank in range(n):
        actor = actor_class.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement.group, placement_group_bundle_index=rank,
                placement_group_capture_child_tasks=True),
        ).remote(model, dict(engine_kwargs, device=device, seed=config.seed + rank), threads)
        replicas.append(RayReplica(ray, rank, actor, placement))
    try:
        for replica in replicas:              # they load at the same time
            try:
                replica.pid = ray.get(replica.actor.pid.remote())
            except Exception as e:
                raise RuntimeError(f"data-parallel replica {replica.rank} failed to start: {summarize(e)}") from e
    except BaseException:
        for replica in replicas:
            replica.shutdown()
        raise
    return replicas


class _Placement:
    """The replicas' placement group, removed when the last of them is shut down."""

    def __init__(self, ray, group, users: int):
        self.ray, self.group, self.users = ray, group, users

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.release_all()

    def release_all(self) -> None:
        from ray.util.placement_group import remove_placement_group
        self.users = 0
        remove_placement_group(self.group)


class RayReplica(Replica):
    """A replica as a Ray actor: each round is one actor call (Ray runs an actor's calls in order)."""

    def __init__(self, ray, rank: int, actor, placement: _Placement):
        super().__init__(rank)
        self.ray, self.actor, self.placement = ray, actor, placement
        self.ref = None                    # the round in flight
        self.stopped = False

    def _send(self, adds: list, aborts: list[str], seconds: float) -> None:
        self.ref = self.actor.run.remote(adds, aborts, seconds)     # a dead actor's error comes with the result

    def receive(self) -> Round:
        ref, self.ref = self.ref, None
        try:
            return self.ray.get(ref)
        except Exception as e:             # ReplicaWorker.run catches the engine's errors: this is Ray's
            raise ReplicaLost(summarize(e)) from None

    @staticmethod
    def wait(replicas: list["RayReplica"]) -> list["RayReplica"]:
        ray, refs = replicas[0].ray, [r.ref for r in replicas]
        ray.wait(refs, num_returns=1)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        return [r for r in replicas if r.ref in ready]

    def shutdown(self) -> None:
        if self.stopped or not self.ray.is_initialized():      # Ray gone (interpreter exit): so are its actors
            return
        self.stopped = True
        try:                               # let the engine stop its own processes, then end the actor
            self.ray.get(self.actor.shutdown.remote(), timeout=30)
        except Exception:
            pass                           # dead already, or stuck: ray.kill ends it either way
        self.ray.kill(self.actor)
        self.placement.release()


# -- Ray Data ------------------------------------------------------------------------------------
class LLMPredictor:
    """A callable class for `Dataset.map_batches`: one LLM per actor. Reads a `prompt` column
    (text or token ids) or a `messages` column (conversations, through the chat template);
    adds `generated_text`, `num_input_tokens` and `num_generated_tokens` (the first completion
    when n > 1). fn_constructor_kwargs: `model`, `sampling_params` (a SamplingParams or a dict
    of its fields), `chat_template_kwargs`, and any engine argument of LLM."""

    def __init__(self, model: str, sampling_params: SamplingParams | dict | None = None,
                 chat_template_kwargs: dict | None = None, **engine_kwargs):
        from nanovllm.llm import LLM
        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams(**sampling_params)
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams or a dict of its fields, "
                             f"got {type(sampling_params).__name__}")
        self.sampling_params = sampling_params
        self.chat_template_kwargs = chat_template_kwargs
        self.llm = LLM(model, **engine_kwargs)

    def __call__(self, batch) -> dict:
        """`batch`: a dict of numpy arrays (Ray Data's default batch format) or a pandas DataFrame."""
        import numpy as np
        if "prompt" in batch:
            prompts = [_as_prompt(p) for p in batch["prompt"]]
            outputs = self.llm.generate(prompts, self.sampling_params, use_tqdm=False)
        elif "messages" in batch:
            conversations = [_as_conversation(m) for m in batch["messages"]]
            outputs = self.llm.chat(conversations, self.sampling_params, use_tqdm=False,
                                    chat_template_kwargs=self.chat_template_kwargs)
        else:
            raise ValueError(f"LLMPredictor reads a 'prompt' or a 'messages' column; the batch has {sorted(batch)}.")
        result = {name: batch[name] for name in batch}
        result["generated_text"] = np.array([out.outputs[0].text for out in outputs], dtype=object)
        result["num_input_tokens"] = np.array([len(out.prompt_token_ids) for out in outputs], dtype=np.int64)
        result["num_generated_tokens"] = np.array([len(out.outputs[0].token_ids) for out in outputs], dtype=np.int64)
        return result


def _as_prompt(value):
    """A column's value as a prompt: numpy strings become str, arrays of ids lists of ints."""
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "tolist"):            # a numpy array (token ids) or a numpy scalar
        value = value.tolist()
    return value


def _as_conversation(messages) -> list[dict]:
    """A conversation as Ray Data hands it (an array of dicts from Arrow structs, where a key
    one message lacks is None) as the list of dicts a chat template reads."""
    return [{key: value for key, value in dict(message).items() if value is not None} for message in messages]
