import pytest
import torch

from crslight.data.datamodules import Synthetic
from crslight.models.retrieval import (
    ItemHead,
    decoder_of,
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


def _test_batch_and_head(tiny_tokenizer, tiny_lm, tmp_path, monkeypatch):
    """A synthetic test batch (30-item catalogue) and a zero-shot head over its catalogue."""
    monkeypatch.setenv("CRSLIGHT_CACHE", str(tmp_path))
    dm = Synthetic(n_dialogues=10, n_items=30, batch_size=4, max_length=512)
    dm._tokenizer = tiny_tokenizer
    dm.setup("test")
    return next(iter(dm.test_dataloader())), ItemHead.for_catalogue(tiny_lm, tiny_tokenizer,
                                                                     dm.corpus("test").item_names)


def test_a_planted_item_ranks_first_after_training(tiny_tokenizer, tiny_lm, tmp_path, monkeypatch):
    batch, head = _test_batch_and_head(tiny_tokenizer, tiny_lm, tmp_path, monkeypatch)
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


def test_a_head_that_does_not_read_the_hidden_state_ranks_without_running_the_policy(tiny_tokenizer, tiny_lm,
                                                                                     tmp_path, monkeypatch):
    batch, head = _test_batch_and_head(tiny_tokenizer, tiny_lm, tmp_path, monkeypatch)
    head.bias.data.normal_()
    assert head.reads_hidden
    head.proj.weight.data.zero_()  # as a head fitted with trains: context
    assert not head.reads_hidden
    with torch.no_grad():
        hidden = turn_hidden_states(tiny_lm, batch.input_ids, batch.attention_mask, batch.rec_row, batch.rec_position)
        expected = head(hidden, tiny_lm.get_output_embeddings().weight, batch.rec_previous)
        monkeypatch.setattr(decoder_of(tiny_lm), "forward", lambda *a, **k: pytest.fail("ran the policy"))
        torch.testing.assert_close(rank_scores(tiny_lm, head, batch), expected)


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


SHOWS = ["Ocean Dreams (2001)", "Haunted Castle (1999)", "Space War (2010)", "Cooking with Grandma (2015)"]


def _text_head(tiny_lm, tiny_tokenizer, turns=2):
    return ItemHead.for_catalogue(tiny_lm, tiny_tokenizer, SHOWS, text_turns=turns)


def test_the_text_part_reads_the_last_turns_and_ranks_the_title_they_talk_about(tiny_tokenizer, tiny_lm):
    head = _text_head(tiny_lm, tiny_tokenizer)
    assert head.reads_text and head.text_items.shape == (4, 384) and int(head.text_turns) == 2
    hidden = torch.zeros(2, tiny_lm.config.hidden_size)
    table = tiny_lm.get_output_embeddings().weight
    contexts = [["seeker: something about ghosts in an old castle", "recommender: hi", "seeker: hello"],
                ["seeker: hello", "recommender: what do you like?", "seeker: films about rockets and planets"]]
    with torch.no_grad():
        scores = head(hidden, table, None, head.encode_contexts(contexts))
    # the first context's castle is three turns back: out of the two turns read
    assert int(scores[1].argmax()) == 2 and int(scores[0].argmax()) != 1
    head.text_turns.fill_(3)
    with torch.no_grad():
        assert int(head(hidden[:1], table, None, head.encode_contexts(contexts[:1])).argmax()) == 1
    with pytest.raises(ValueError, match="read the context's words"):
        head(hidden, table)


def test_text_scores_fit_and_their_weight_is_chosen_on_held_out_samples(tiny_tokenizer, tiny_lm):
    from crslight.models.retrieval import SlotData, choose_text_weight, fit_item_scores

    head = _text_head(tiny_lm, tiny_tokenizer)
    words = ["I am hungry", "scary ghosts please", "I love the sea", "rockets and stars"]
    planted = [3, 1, 0, 2]  # the title each context asks for
    contexts = [[f"seeker: {w}"] for w in words] * 8
    target = torch.tensor(planted * 8)
    text = head.encode_contexts(contexts)
    data = SlotData(torch.zeros(len(target), tiny_lm.config.hidden_size), target,
                    torch.full((len(target), 1), -1), text)
    table = tiny_lm.get_output_embeddings().weight
    fit = fit_item_scores(head, data, data, table, epochs=2, lr=5e-2, trains="context", text_epochs=30)
    assert fit["text_last_loss"] < fit["text_first_loss"]
    assert fit["text_weight"] > 0 and fit["held_out_recall"] > fit["held_out_recall_without_text"]
    with torch.no_grad():
        assert head(data.hidden, table, data.previous, text).argmax(-1).tolist() == planted * 8
    # where the words point away from the targets the text part gets no weight
    wrong = data._replace(target=torch.tensor([1, 0, 3, 3] * 8))
    weight, found = choose_text_weight(head, wrong, table)
    assert weight == 0.0 and float(head.text_scale.detach()) == 0.0 and found[0.0] >= max(found.values())


def test_a_head_with_a_text_part_round_trips(tiny_tokenizer, tiny_lm):
    head = _text_head(tiny_lm, tiny_tokenizer, turns=5)
    with torch.no_grad():
        head.text_scale.fill_(3.0)
        head.text_items.mul_(-1)
    again = ItemHead.from_state_dict({f"h.{k}": v for k, v in head.state_dict().items()}, prefix="h.")
    assert again.reads_text and int(again.text_turns) == 5
    hidden = torch.randn(1, tiny_lm.config.hidden_size)
    text = head.encode_contexts([["seeker: a film at sea"]])
    table = tiny_lm.get_output_embeddings().weight
    assert torch.equal(again(hidden, table, None, text), head(hidden, table, None, text))


def test_several_windows_read_the_recent_request_and_the_older_turns_together(tiny_tokenizer, tiny_lm):
    from crslight.models.encoder import SentenceEncoder

    head = _text_head(tiny_lm, tiny_tokenizer, turns=[1, 3])
    context = ["seeker: something about ghosts in an old castle", "recommender: hi",
               "seeker: or rockets and planets maybe"]
    encoder = SentenceEncoder("minilm")
    expected = torch.nn.functional.normalize(encoder.encode([context[-1]]) + encoder.encode([" ".join(context)]), dim=-1)
    text = head.encode_contexts([context])
    torch.testing.assert_close(text, expected)
    hidden, table = torch.zeros(1, tiny_lm.config.hidden_size), tiny_lm.get_output_embeddings().weight
    with torch.no_grad():
        top_two = set(head(hidden, table, None, text)[0].topk(2).indices.tolist())
    assert top_two == {1, 2}  # the castle three turns back and the rockets of the last turn
    again = ItemHead.from_state_dict(head.state_dict())
    assert again.text_turns.tolist() == [1, 3]
    torch.testing.assert_close(again.encode_contexts([context]), text)


@pytest.mark.parametrize("turns", [-1, [3, 0], [2.5]])
def test_a_bad_text_window_is_refused_with_the_option_named(turns):
    from crslight.models.retrieval import text_windows

    with pytest.raises(ValueError, match="item_text_turns"):
        text_windows(turns)


def test_a_tuned_text_encoder_learns_words_the_titles_lack_and_is_saved_with_the_head(tiny_tokenizer, tiny_lm):
    from crslight.models.retrieval import SlotData, fit_item_scores

    head = _text_head(tiny_lm, tiny_tokenizer, turns=1)
    # words that none of the titles resemble, each standing for one show
    words = ["my aunt Berta visits on sundays", "the printer jammed again", "tax season is here", "my knee hurts"]
    planted = [2, 0, 3, 1]
    contexts = [[f"seeker: {w}"] for w in words] * 4
    target = torch.tensor(planted * 4)
    hidden = torch.zeros(len(target), tiny_lm.config.hidden_size)
    data = SlotData(hidden, target, torch.full((len(target), 1), -1), None, contexts)
    table = tiny_lm.get_output_embeddings().weight
    frozen = head.encode_contexts(contexts[:4])
    torch.manual_seed(0)
    fit = fit_item_scores(head, data, data, table, epochs=1, lr=5e-2, trains="context", tune_epochs=6,
                          tune_lr=1e-4)
    assert head.text_encoder is not None and not any(p.requires_grad for p in head.text_encoder.parameters())
    assert fit["text_last_loss"] < fit["text_first_loss"]
    tuned = head.encode_contexts(contexts[:4])
    assert not torch.allclose(tuned, frozen)  # the contexts are read by the tuned copy, not the shared encoder
    with torch.no_grad():
        assert head(hidden[:4], table, None, tuned).argmax(-1).tolist() == planted
    # the tuned weights travel in the head's state dict; a loaded head reads contexts as the tuned one does
    again = ItemHead.from_state_dict(head.state_dict()).requires_grad_(True)
    assert not any(p.requires_grad for p in again.text_encoder.parameters()) and again.text_scale.requires_grad
    torch.testing.assert_close(again.encode_contexts(contexts[:4]), tuned)
