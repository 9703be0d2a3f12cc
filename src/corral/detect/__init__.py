from corral.detect.detector import Detector, Judgement
from corral.detect.rules import Rule, RuleError, RuleSet, load

__all__ = ["Detector", "Judgement", "Rule", "RuleError", "RuleSet", "load"]
