"""ilnas: interleaving learning (K learners, M rounds, one shared architecture) for DARTS-family NAS."""
from ilnas.errors import IlnasError
from ilnas.search.engine import EngineConfig, Learner, SearchState, Stage, search_step
from ilnas.space.genotype import Genotype, derive_genotype, load_genotype, parse_genotype, zoo
from ilnas.space.supernet import Supernet

__all__ = ["IlnasError", "EngineConfig", "Learner", "SearchState", "Stage", "search_step", "Genotype",
           "derive_genotype", "load_genotype", "parse_genotype", "zoo", "Supernet"]
__version__ = "0.1.0"
