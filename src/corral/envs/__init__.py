"""Trainer-facing environments over corral's episodes."""

from corral.envs.gym_env import SandboxEnv, register
from corral.envs.trl_env import CorralTRLEnv

register()

__all__ = ["CorralTRLEnv", "SandboxEnv", "register"]
