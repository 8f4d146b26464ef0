"""cluster.placement: the stage-aware policy that says which node holds each rank's slot.
Pure: no Ray, no processes."""

import pytest

from shardgrad.cluster.placement import Node, describe, place


def nodes(*cpus, gpus=0):
    return [Node(f"id{i}", f"10.0.0.{i}", c, gpus) for i, c in enumerate(cpus)]


def test_two_pipelines_over_two_nodes_one_pipeline_a_node():
    # pp = 2 x dp = 2 over two nodes of two slots: each pipeline's stages share a node, and the
    # two replicas of each stage are on different nodes.
    assert place(2, 2, nodes(2, 2), 1) == [0, 0, 1, 1]


def test_replicas_spread_even_when_one_node_could_hold_them_all():
    assert place(2, 2, nodes(4, 4), 1) == [0, 0, 1, 1]
    assert place(3, 2, nodes(4, 4), 1) == [0, 0, 1, 1, 0, 0]


def test_stages_of_a_replica_stay_together_before_replicas_spread():
    # three stages fit on either node: each replica on one node, not stage-by-stage alternation
    assert place(2, 3, nodes(3, 3), 1) == [0, 0, 0, 1, 1, 1]
    # a replica that cannot fit on one node spans as few as it can
    assert place(1, 4, nodes(1, 3), 1) == [1, 1, 1, 0]


def test_one_node_or_one_slot_a_node():
    assert place(2, 2, nodes(4), 1) == [0, 0, 0, 0]
    assert place(2, 2, nodes(1, 1, 1, 1), 1) == [0, 1, 2, 3]


def test_rank_zero_starts_on_the_launchers_node_when_it_fits_as_well():
    ns = nodes(2, 2)
    assert place(1, 2, ns, 1, first="id1") == [1, 1]
    assert place(2, 2, ns, 1, first="id1") == [1, 1, 0, 0]
    # a node that holds the whole pipeline wins over the launcher's node that does not
    assert place(1, 2, nodes(2, 1), 1, first="id1") == [0, 0]


def test_gpus_limit_the_slots():
    ns = [Node("a", "a", 8, 1), Node("b", "b", 8, 2)]
    assert place(1, 2, ns, 1, gpus=1) == [1, 1]
    assert place(1, 3, ns, 1, gpus=1) == [1, 1, 0]
    assert place(2, 2, ns, 2, gpus=0.5) == [1, 1, 0, 0]


def test_too_few_slots_says_what_was_asked_and_what_the_nodes_have():
    with pytest.raises(ValueError, match=r"4 ranks of 1 CPU \+ 1 GPU do not fit .*"
                                         r"10.0.0.0 4 CPU \+ 1 GPU, 10.0.0.1 4 CPU \+ 1 GPU"
                                         r"\): 2 fit"):
        place(2, 2, nodes(4, 4, gpus=1), 1, gpus=1)


def test_describe_names_each_nodes_ranks_and_stages():
    ns = nodes(2, 2)
    text = describe(place(2, 2, ns, 1), ns, 2, 1)
    assert text.splitlines() == [
        "Ray placement: 4 slots of 1 CPU, one per rank (rank = replica * 2 + stage)",
        "  node 10.0.0.0 (id id0): ranks 0 1 = replica 0 stage 0, replica 0 stage 1",
        "  node 10.0.0.1 (id id1): ranks 2 3 = replica 1 stage 0, replica 1 stage 1"]
