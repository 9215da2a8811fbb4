"""MemoryBank: FIFO order and wrap-around against a deque model (n > size included), placeholders, state."""

import collections

import pytest
import torch

from cpsl_hf.selflabel import MemoryBank


def valid_rows_of(model: collections.deque) -> torch.Tensor:
    rows = [row for row, valid in model if valid]
    return torch.stack(rows) if rows else torch.zeros(0, 3)


@pytest.mark.parametrize("size", [1, 5, 8])
def test_fifo_matches_deque_model(size):
    generator = torch.Generator().manual_seed(size)
    bank = MemoryBank(size, 3)
    model = collections.deque(maxlen=size)
    counter = 0
    for count in [3, 1, 4, 0, 2, 9, size, 17, 2, 5]:  # n does not divide size; n > size too
        rows = torch.arange(counter, counter + count, dtype=torch.float32)[:, None].repeat(1, 3)
        counter += count
        valid = torch.rand(count, generator=generator) > 0.3
        bank.enqueue(rows, valid)
        model.extend(zip(rows, valid.tolist()))
        torch.testing.assert_close(bank.get(), valid_rows_of(model), rtol=0, atol=0)
        assert len(bank) == sum(valid for _, valid in model)
        assert int(bank.pointer) == counter % size
        torch.testing.assert_close(bank.fill_fraction(), torch.tensor(len(bank) / size))


def test_without_valid_all_rows_count_and_order_is_oldest_first():
    bank = MemoryBank(4, 2)
    bank.enqueue(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert len(bank) == 3
    torch.testing.assert_close(bank.get()[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    bank.enqueue(torch.tensor([[4.0, 4.0], [5.0, 5.0]]))
    torch.testing.assert_close(bank.get()[:, 0], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    # the storage is a ring: row 5 went to slot 0, no rows were shifted
    torch.testing.assert_close(bank.embeddings[:, 0], torch.tensor([5.0, 2.0, 3.0, 4.0]))


def test_state_round_trip_continues_identically():
    bank = MemoryBank(6, 4)
    bank.enqueue(torch.randn(4, 4))
    bank.enqueue(torch.randn(5, 4), torch.tensor([True, False, True, True, False]))
    restored = MemoryBank(6, 4)
    restored.load_state_dict(bank.state_dict())
    assert set(bank.state_dict()) == {"embeddings", "valid", "pointer"}
    torch.testing.assert_close(restored.get(), bank.get())
    more = torch.randn(3, 4)
    bank.enqueue(more)
    restored.enqueue(more)
    torch.testing.assert_close(restored.get(), bank.get())
    assert int(restored.pointer) == int(bank.pointer)


def test_reset_and_dtype():
    bank = MemoryBank(3, 2, dtype=torch.float64)
    bank.enqueue(torch.ones(2, 2))
    assert bank.embeddings.dtype == torch.float64
    bank.reset()
    assert len(bank) == 0 and int(bank.pointer) == 0 and bank.get().shape == (0, 2)


def test_bad_input_raises():
    bank = MemoryBank(3, 2)
    with pytest.raises(ValueError, match="n x 2"):
        bank.enqueue(torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid"):
        bank.enqueue(torch.ones(2, 2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        MemoryBank(0, 2)
