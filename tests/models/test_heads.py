import math

import torch

from crslight.models.heads import (
    ScalarHead,
    gather_last_token,
    last_token_index,
    position_ids_from_attention_mask,
)


def test_last_token_index_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert last_token_index(right).tolist() == [1, 3, 0]
    assert last_token_index(torch.zeros(1, 4)).tolist() == [0]


def test_gather_last_token_picks_rows():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    # row 0 right padded -> position 1 = [2, 3]; row 1 left padded -> position 2 = [10, 11]
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(gather_last_token(hidden, mask), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))


def test_position_ids_from_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_last_token_hidden_state_same_for_left_and_right_padding(tiny_lm, tiny_tokenizer):
    texts = ["I want a funny movie", "Hi"]
    states = {}
    for side in ("left", "right"):
        batch = tiny_tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
        position_ids = position_ids_from_attention_mask(batch["attention_mask"])
        with torch.no_grad():
            hidden = tiny_lm.model(**batch, position_ids=position_ids).last_hidden_state
        states[side] = gather_last_token(hidden, batch["attention_mask"])
    with torch.no_grad():
        alone = tiny_lm.model(**tiny_tokenizer(["Hi"], return_tensors="pt")).last_hidden_state[:, -1]
    torch.testing.assert_close(states["left"], states["right"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(states["left"][1:], alone, atol=1e-5, rtol=1e-4)


def test_scalar_head_shapes_init_and_dtype():
    torch.manual_seed(0)
    head = ScalarHead(64)
    assert head(torch.randn(2, 5, 64)).shape == (2, 5)  # value head: one value per token
    assert head(torch.randn(2, 64)).shape == (2,)  # reward head on gathered states
    assert torch.all(head.proj.bias == 0)
    assert abs(head.proj.weight.std().item() - 1 / math.sqrt(65)) < 0.05
    assert head(torch.randn(2, 3, 64, dtype=torch.bfloat16)).dtype == torch.float32


def test_score_last_token_reads_the_last_real_token():
    head = ScalarHead(4)
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected = torch.stack([head(hidden[0, 1]), head(hidden[1, 2])])
    torch.testing.assert_close(head.score_last_token(hidden, mask), expected)
