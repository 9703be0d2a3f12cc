"""`corral bench redteam`: a corpus of attack cases and benign look-alikes, run against corral in fresh
sandboxes and a fake world, scored per family (detection rate, false positives, time to detect, bytes
leaked). See corral.redteam.corpus (the case schema), .world (the hosts) and .bench (the engine)."""

from corral.redteam.corpus import FAMILIES, FAMILY_NAMES, Case, CorpusError, load_cases, select

__all__ = ["FAMILIES", "FAMILY_NAMES", "Case", "CorpusError", "load_cases", "select"]
