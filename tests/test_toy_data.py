import torch
from torch.utils.data import DataLoader

from hyperlora.toy.data import ToyPortraits, render_arrays, to_tensor, to_uint8
from hyperlora.toy.render import split_identities


def test_dataset_items_are_deterministic_and_batch():
    data = ToyPortraits(split_identities("train", num_train=10), n_per_identity=3, seed=5)
    assert len(data) == 30
    a, b = data[7], data[7]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    assert a["identity"] == 2 and a["pixel_values"].shape == (3, 64, 64)
    assert -1 <= a["pixel_values"].min() and a["pixel_values"].max() <= 1
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4


def test_arrays_match_items_and_uint8_round_trips():
    data = ToyPortraits(split_identities("test"), n_per_identity=2, seed=0)
    small = ToyPortraits(data.identities[:3], 2, seed=0)
    arrays = render_arrays(small, progress=False)
    assert arrays["images"].shape == (6, 64, 64, 3)
    assert (to_uint8(to_tensor(arrays["images"][4])) == arrays["images"][4]).all()
    assert arrays["identities"].tolist() == [data.identities[i // 2] for i in range(6)]
