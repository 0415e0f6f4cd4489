"""ilnas: interleaving learning (K learners, M rounds, one shared architecture) for DARTS-family NAS."""
from ilnas.data.tasks import Task, create_task
from ilnas.errors import IlnasError
from ilnas.recipes.search import run_search
from ilnas.recipes.train import run_train
from ilnas.search.engine import EngineConfig, Learner, SearchState, Stage, search_step
from ilnas.space.genotype import Genotype, derive_genotype, load_genotype, parse_genotype, zoo
from ilnas.space.network import NetworkCIFAR, NetworkImageNet
from ilnas.space.supernet import Supernet

__all__ = ["IlnasError", "Task", "create_task", "run_search", "run_train", "EngineConfig", "Learner",
           "SearchState", "Stage", "search_step", "Genotype", "derive_genotype", "load_genotype",
           "parse_genotype", "zoo", "NetworkCIFAR", "NetworkImageNet", "Supernet"]
__version__ = "0.1.0"
