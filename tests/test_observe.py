import pytest
import torch

from hcpolicy.observe import LayerCache, Observation, Phase
from hcpolicy.policy.baselines import StreamingLLM
from hcpolicy.scores import attention_weights
from hcpolicy.spec import ModelSpec


def test_left_padding_is_never_valid_nor_attended():
    keys = torch.randn(2, 1, 6, 4)
    cache = LayerCache.dense(keys, starts=torch.tensor([0, 2]))  # sequence 1 has 2 pad slots
    assert cache.valid()[1, 0].tolist() == [False, False, True, True, True, True]
    assert cache.valid()[0].all()
    w = attention_weights(torch.randn(2, 1, 1, 4), torch.tensor([5]), cache)
    assert w[1, 0, 0, :2].tolist() == [0.0, 0.0]
    assert w[1, 0, 0].sum().item() == pytest.approx(1.0)


def test_streamingllm_sinks_count_from_the_first_real_token():
    spec = ModelSpec("s", 1, 1, 1, 4)
    pol = StreamingLLM(compression=0.5, sinks=1)
    pol.reset(spec, 2)
    cache = LayerCache.dense(torch.randn(2, 1, 8, 4), starts=torch.tensor([0, 3]))
    obs = Observation(
        phase=Phase.PREFILL, layer=0, queries=torch.randn(2, 1, 1, 4), query_positions=torch.tensor([7]),
        cache=cache, prompt_length=8,
    )  # fmt: skip
    (select,) = pol.prefill(obs)
    kept = select.selection.as_lists()
    assert kept[0][0] == [0, 5, 6, 7]
    # sequence 1 has 5 real tokens, so half of them: its sink (position 3, not a pad slot)
    # and the newest token
    assert kept[1][0] == [3, 7]


def test_layer_cache_shape_checks():
    with pytest.raises(ValueError, match="starts"):
        LayerCache.dense(torch.randn(2, 1, 3, 4), starts=torch.tensor([0]))
    with pytest.raises(ValueError, match="positions"):
        LayerCache(keys=torch.randn(1, 1, 3, 4), positions=torch.zeros(1, 1, 2, dtype=torch.int64),
                   lengths=torch.ones(1, 1, dtype=torch.int64))


def test_host_starts_come_with_starts_and_are_read_for_free():
    keys = torch.randn(2, 1, 6, 4)
    cache = LayerCache.dense(keys, starts=torch.tensor([0, 2]), host_starts=[0, 2])
    assert cache.host_starts == (0, 2) and cache.starts_list() == [0, 2]
    assert LayerCache.dense(keys, starts=torch.tensor([0, 2])).starts_list() == [0, 2]  # read from the device
    assert LayerCache.dense(keys).starts_list() is None
    with pytest.raises(ValueError, match="host_starts"):
        LayerCache.dense(keys, host_starts=[0, 2])
    with pytest.raises(ValueError, match="host_starts"):
        LayerCache.dense(keys, starts=torch.tensor([0, 2]), host_starts=[0])
