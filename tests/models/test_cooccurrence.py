"""EASE links kept per item, and the item scores' context terms built on them."""

import numpy as np
import scipy.sparse as sp
import torch

from crslight.models.cooccurrence import ease, mention_matrix, top_links
from crslight.models.retrieval import ItemHead


def test_mention_matrix_marks_each_dialogue_once_per_item():
    dialogues = [[{"items": ["a", "b"]}, {"items": ["a"]}], [{"items": ["c", "zz"]}]]
    x = mention_matrix(dialogues, {"a": 0, "b": 1, "c": 2, "d": 3})
    assert x.toarray().tolist() == [[1, 1, 0, 0], [0, 0, 1, 0]]


def test_top_links_keep_the_strongest_positive_weights():
    items = np.array([0, 2, 3])  # catalogue columns fitted (column 1 never mentioned)
    weights = np.array([[0.0, 0.5, -0.2], [0.3, 0.0, 0.1], [0.0, 0.0, 0.0]])
    index, value = top_links(items, weights, num_items=4, k=2)
    assert index.tolist() == [[2, -1], [-1, -1], [0, 3], [-1, -1]]  # negatives and zeros are no links
    assert torch.allclose(value, torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.3, 0.1], [0.0, 0.0]]))


def test_ease_links_items_mentioned_together():
    # a and b always together, c alone: EASE weighs b for a (and a for b), nothing for c
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=float))
    items, weights = ease(x, l2=1.0)
    assert items.tolist() == [0, 1, 2]
    assert weights[0, 1] > 0.5 and weights[1, 0] > 0.5 and abs(weights[0, 2]) < 1e-9 and weights[0, 0] == 0


def test_context_scores_by_hand():
    head = ItemHead(4, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), links=2)  # three items
    head.set_links(torch.tensor([[1, 2], [0, -1], [-1, -1]]), torch.tensor([[0.5, 0.25], [2.0, 0.0], [0.0, 0.0]]))
    with torch.no_grad():
        head.link_weight.fill_(2.0)
        head.mention_bonus.fill_(3.0)
    previous = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    # row 0 mentions items 0 and 1: links 0->1 (0.5), 0->2 (0.25), 1->0 (2.0), times 2; both get the bonus 3
    # row 1 mentions item 2 (no links): the bonus on item 2 only; row 2 mentions nothing
    expected = torch.tensor([[2 * 2.0 + 3, 2 * 0.5 + 3, 2 * 0.25], [0, 0, 3], [0, 0, 0]])
    assert torch.allclose(head.context_scores(previous), expected)
    hidden, table = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.allclose(head(hidden, table, previous), head(hidden, table) + expected)
    # the recommendation distribution never names an item the dialogue mentioned
    logp = head.log_probs(hidden, table, previous)
    assert torch.isinf(logp[0, :2]).all() and torch.isinf(logp[1, 2]) and torch.isfinite(logp[2]).all()
    # unless the dialogue has mentioned every item: then any may be named again
    assert torch.isfinite(head.log_probs(hidden[:1], table, torch.tensor([[0, 1, 2]]))).all()
    # and a head rebuilt from its state dict scores alike (links included)
    rebuilt = ItemHead.from_state_dict(head.state_dict())
    assert torch.equal(rebuilt(hidden, table, previous), head(hidden, table, previous))


def test_a_checkpoint_brings_its_links_into_a_fresh_head(tiny_policy):
    from crslight.modules.sft import SFTModule

    module = SFTModule(model=tiny_policy)
    module.configure_model()
    module.item_head = ItemHead(64, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))  # built fresh: no links
    trained = ItemHead(64, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), links=2)
    trained.set_links(torch.tensor([[1, 2], [0, -1], [-1, -1]]), torch.tensor([[0.5, 0.2], [1.0, 0.0], [0.0, 0.0]]))
    state = {f"item_head.{k}": v for k, v in trained.state_dict().items()}
    module.on_load_checkpoint({"state_dict": state})
    module.item_head.load_state_dict(trained.state_dict())
    assert torch.equal(module.item_head.link_index, trained.link_index)
