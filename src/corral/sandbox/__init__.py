from corral.sandbox.sandbox import ExecResult, OutputChunk, Sandbox, Session

__all__ = ["ExecResult", "OutputChunk", "Sandbox", "Session"]
