"""The engine settings the data-parallel test runs on two ranks and on one process, and the problem they run on
(shared by both sides)."""
from helpers import FOUR_OP_NAMES, Problem, make_problem
from ilnas.optim import SGD
from ilnas.search.engine import EngineConfig

STEPS = 2
CASES = {
    # IL, the default chain: prox coupling, finite-difference HVPs, Algorithm 1's update order
    "il-prox-fd": (EngineConfig(), SGD(), 0.05),
    # copy coupling needs the weight part of every HVP and recomputes clipped stage gradients;
    # DARTS's order recomputes the weight step at the new A
    "il-copy-exact-darts": (EngineConfig(coupling="copy", hvp="exact", update_order="darts"), SGD(grad_clip=0.5), 0.05),
    "first-order": (EngineConfig(order=1), SGD(), 0.05),
}


def problem() -> Problem:
    """The float64 test problem on four operations: how ranks split a step does not depend on the operations."""
    return make_problem(primitives=FOUR_OP_NAMES)
