import torch

from crslight.data.datamodules import Synthetic
from crslight.models.retrieval import (
    ItemHead,
    previous_mask,
    rank_scores,
    retrieval_loss,
    title_token_ids,
    turn_hidden_states,
)


def test_zero_shot_score_is_the_mean_next_token_logit_of_the_title(tiny_tokenizer, tiny_lm):
    names = ["Heat (1995)", "Up (2009)", "The Lost Kingdom (2001)"]
    head = ItemHead.for_catalogue(tiny_lm, tiny_tokenizer, names)
    ids = torch.tensor([tiny_tokenizer("hello there, try")["input_ids"]])
    with torch.no_grad():
        logits = tiny_lm(ids).logits[0, -1]
        hidden = tiny_lm(ids, output_hidden_states=True).hidden_states[-1][0, -1:]
        scores = head(hidden, tiny_lm.get_output_embeddings().weight)[0]
    for i, name in enumerate(["Heat", "Up", "The Lost Kingdom"]):
        title = tiny_tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        assert torch.allclose(scores[i], logits[title].mean(), atol=1e-4)


def test_title_ids_drop_the_year(tiny_tokenizer):
    ids, offsets = title_token_ids(tiny_tokenizer, ["Heat (1995)", "Up"])
    assert tiny_tokenizer.decode(ids[offsets[0]:offsets[1]]) == " Heat"
    assert tiny_tokenizer.decode(ids[offsets[1]:]) == " Up"


def test_a_planted_item_ranks_first_after_training(tiny_tokenizer, tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    dm = Synthetic(n_dialogues=10, n_items=30, batch_size=4, max_length=512)
    dm._tokenizer = tiny_tokenizer
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    head = ItemHead.for_catalogue(tiny_lm, tiny_tokenizer, dm.corpus("test").item_names)
    with torch.no_grad():
        hidden = turn_hidden_states(tiny_lm, batch.input_ids, batch.attention_mask, batch.rec_row, batch.rec_position)
        before = rank_scores(tiny_lm, head, batch)
    embeddings = tiny_lm.get_output_embeddings().weight.detach()
    assert torch.allclose(head(hidden, embeddings), before)
    planted = torch.full_like(batch.rec_target, 7)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(30):
        loss = retrieval_loss(head(hidden, embeddings), planted)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = rank_scores(tiny_lm, head, batch)
    assert scores.shape == (len(batch.rec_target), 30)
    assert (scores.argmax(-1) == 7).all() and not (before.argmax(-1) == 7).all()


def test_previous_mask():
    mask = previous_mask(torch.tensor([[2, 0], [-1, -1], [1, -1]]), 4)
    assert mask.tolist() == [[True, False, True, False], [False] * 4, [False, True, False, False]]


def test_head_round_trips_through_its_state_dict(tiny_tokenizer, tiny_lm):
    head = ItemHead.for_catalogue(tiny_lm, tiny_tokenizer, ["Heat (1995)", "Up (2009)"])
    with torch.no_grad():
        head.bias.add_(torch.tensor([0.5, -0.5]))
        head.proj.weight.mul_(2)
    state = {f"item_head.{k}": v for k, v in head.state_dict().items()}
    again = ItemHead.from_state_dict(state, prefix="item_head.")
    hidden = torch.randn(3, tiny_lm.config.hidden_size)
    embeddings = tiny_lm.get_output_embeddings().weight
    assert torch.equal(again(hidden, embeddings), head(hidden, embeddings))
