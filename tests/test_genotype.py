"""Genotype: derivation on hand-set alphas, the official string format, JSON, the zoo."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from helpers import listed_the_other_way
from ilnas.errors import IlnasError
from ilnas.space.genotype import Genotype, derive_genotype, load_genotype, parse_genotype, zoo
from ilnas.space.layout import PRIMITIVES, num_edges

OP = {p: i for i, p in enumerate(PRIMITIVES)}


def published_lines() -> list[str]:
    text = resources.files("ilnas.space").joinpath("zoo.txt").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_hand_set_alphas_decode_to_the_expected_cell():
    w = torch.full((num_edges(), len(PRIMITIVES)), 0.01)
    # node 0 (edges 0, 1): both inputs; node 1 (edges 2-4): inputs 2 and 0; node 2 (5-8): 3 and 1;
    # node 3 (9-13): 4 and 2. 'none' is strongest on edge 4 but never counts.
    plan = {0: ("sep_conv_3x3", 0.5), 1: ("skip_connect", 0.4), 2: ("max_pool_3x3", 0.3),
            4: ("dil_conv_5x5", 0.6), 5: ("avg_pool_3x3", 0.2), 6: ("sep_conv_5x5", 0.3), 8: ("dil_conv_3x3", 0.9),
            11: ("sep_conv_3x3", 0.7), 13: ("skip_connect", 0.8)}
    for edge, (op, value) in plan.items():
        w[edge, OP[op]] = value
    w[3, OP["none"]] = 0.99
    g = derive_genotype(w, w)
    assert g.normal == (("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 0),
                        ("dil_conv_3x3", 3), ("sep_conv_5x5", 1), ("skip_connect", 4), ("sep_conv_3x3", 2))
    assert g.normal_concat == (2, 3, 4, 5)
    assert g.reduce == g.normal


@pytest.mark.parametrize("line", published_lines(), ids=lambda l: l.split("=")[0].strip())
def test_every_published_literal_parses_and_round_trips(line):
    name, _, literal = line.partition("=")
    g = parse_genotype(line)  # verbatim, with its NAME = prefix
    assert g == parse_genotype(literal)
    assert parse_genotype(g.to_string()) == g
    assert Genotype.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert zoo()[name.strip()] == g
    assert len(g.normal) == len(g.reduce) == 8 and g.normal_concat == (2, 3, 4, 5)


def test_list_concat_and_log_line_forms():
    g = zoo()["DARTS_V2"]
    as_list = g.to_string().replace("range(2, 6)", "[2, 3, 4, 5]")
    assert parse_genotype(as_list) == g
    log = "2026-01-01 12:00:00 genotype = " + g.to_string()
    assert parse_genotype(log) == g
    assert g.normal[0] == ("sep_conv_3x3", 0) and g.reduce[-1] == ("max_pool_3x3", 1)


def test_load_genotype_from_name_json_run_dir_and_literal(tmp_path):
    g = zoo()["PDARTS"]
    (tmp_path / "genotype.json").write_text(json.dumps(g.to_dict()))
    assert load_genotype("PDARTS") == g
    assert load_genotype(str(tmp_path / "genotype.json")) == g
    assert load_genotype(str(tmp_path)) == g
    assert load_genotype(g.to_string()) == g


@pytest.mark.parametrize("text, message", [
    ("Genotype(normal=[('foo_conv', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "unknown operation 'foo_conv'"),
    ("Genotype(normal=[('sep_conv_3x3', 5), ('sep_conv_3x3', 0)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "does not exist yet"),
    ("Genotype(normal=[('sep_conv_3x3', 0)", "not a valid"),
    ("Genotype(normal=__import__('os').system('true'))", r"^malformed genotype: normal is no literal \(.*nothing is "
     r"evaluated\): __import__\('os'\).system\('true'\)$"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 4, normal_concat=range(2, 6))",
     r"^malformed genotype: normal is no literal .*: \[\('sep_conv_3x3', 0\), \('sep_conv_3x3', 1\)\] \* 4$"),
    ("Genotype(normal=[], colour=[])", "unknown field"),
    ("not a genotype at all", "unknown genotype"),
    ("runs/gone/search", "genotype runs/gone/search: no such file or run directory"),  # a path, not a zoo name
    ("gone.json", "genotype gone.json: no such file or run directory"),
])
def test_malformed_genotypes_are_refused(text, message):
    with pytest.raises(IlnasError, match=message):
        load_genotype(text)


def test_random_cells_are_valid_reproducible_and_varied():
    from ilnas.space.genotype import random_genotype

    cells = [random_genotype(seed) for seed in range(20)]
    assert random_genotype(3) == cells[3] == load_genotype("random:3")
    assert len({c.to_string() for c in cells}) == 20
    for c in cells:
        assert parse_genotype(c.to_string()) == c
        assert all(op != "none" for op, _ in c.normal + c.reduce)
        for i in range(4):  # two distinct inputs per node, each an input or an earlier node
            (_, a), (_, b) = c.normal[2 * i:2 * i + 2]
            assert a != b and max(a, b) < 2 + i


def test_random_cells_of_another_space_draw_from_its_operations():
    """random:SEED:OPS: the DARTS list gives random:SEED's cell; another list only its operations (none never),
    each of the 20 cells' 16 choices from the two; a list that cannot be drawn from is one line."""
    assert load_genotype("random:3:" + ", ".join(PRIMITIVES)) == load_genotype("random:3")
    cells = [load_genotype(f"random:{seed}:none,skip_connect,conv_7x1_1x7") for seed in range(20)]
    assert {op for c in cells for op, _ in c.normal + c.reduce} == {"skip_connect", "conv_7x1_1x7"}
    for spec, why in (("random:1:skip_connect,conv_3x3", "'conv_3x3' is unknown"),
                      ("random:1:skip_connect,skip_connect", "'skip_connect' is named twice"),
                      ("random:1:none", "only none is named"), ("random:1:", "'' is unknown")):
        with pytest.raises(IlnasError, match=f"^random:SEED:OPS draws from the operations OPS .*: {why}; known: "):
            load_genotype(spec)


def test_shared_choices_compare_each_node_as_a_set_of_two_edges():
    from ilnas.space.genotype import random_genotype, shared_choices

    v1, v2 = zoo()["DARTS_V1"], zoo()["DARTS_V2"]
    # Counted by hand: normal nodes share 2 (listed in the other order), 1, 2 and 0 edges; reduction 2, 1, 2, 1.
    assert (shared_choices(v1, v2, cells=("normal",)), shared_choices(v1, v2, cells=("reduce",))) == (5, 6)
    assert shared_choices(v1, v2) == shared_choices(v2, v1) == 11 and shared_choices(v1, v1) == v1.choices == 16
    swapped = listed_the_other_way(v2)
    assert swapped != v2 and shared_choices(swapped, v2) == 16
    # Two cells drawn uniformly share, per node of n inputs, n * (2/n)^2 * 1/7 = 4 / (7 n) choices on average (an
    # input both drew, each with probability 2/n, with the same of the 7 ops): over the nodes' 2, 3, 4 and 5
    # inputs and both cells, 0.0917 of the 16.
    shares = [shared_choices(random_genotype(s), random_genotype(s + 1000)) / 16 for s in range(1000)]
    assert abs(sum(shares) / len(shares) - 2 * sum(4 / (7 * n) for n in (2, 3, 4, 5)) / 16) < 0.006
    small = Genotype(v1.normal[:2], (2,), v1.reduce[:2], (2,))
    with pytest.raises(IlnasError, match="cells of 4 and 1 nodes"):
        shared_choices(v1, small)
