"""FlatLogprobs: the engine's per-token logprobs, stored flat, behave as a list of dicts."""
import pickle

import pytest

from nanovllm.engine.logprob_rows import FlatLogprobs
from nanovllm.outputs import Logprob


def entries(n: int) -> list[dict[int, Logprob]]:
    return [{10 * i + j: Logprob(-0.5 * j - i, j + 1, f"t{i}{j}") for j in range(1 + i % 3)} for i in range(n)]


def test_flat_logprobs_behave_as_a_list_of_dicts():
    plain = entries(7)
    flat = FlatLogprobs()
    for i, entry in enumerate(plain):
        if i % 2:
            flat.append(entry)
        else:                                    # the engine's way: parallel lists
            flat.add(list(entry), [v.logprob for v in entry.values()], [v.rank for v in entry.values()],
                     [v.decoded_token for v in entry.values()])
    assert len(flat) == 7 and list(flat) == plain and flat == plain
    assert flat[0] == plain[0] and flat[-1] == plain[-1] and flat[2][21].decoded_token == "t21"
    with pytest.raises(IndexError):
        flat[7]
    for piece in (slice(2, 5), slice(5, None), slice(None, -2), slice(4, 2), slice(None, None, 2), slice(None)):
        assert flat[piece] == plain[piece] and isinstance(flat[piece], FlatLogprobs)
    assert flat[2:5][0] == plain[2]
    assert flat + plain[:2] == plain + plain[:2] and plain[:2] + flat == plain[:2] + plain
    assert flat[:3] + flat[3:] == plain and ([] + FlatLogprobs()) == []
    assert pickle.loads(pickle.dumps(flat)) == plain       # through the engine process's pipe
    assert flat != plain[:-1] and repr(flat) == repr(plain)
