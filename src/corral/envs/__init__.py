"""Trainer-facing environments over corral's episodes."""

from corral.envs.gym_env import SandboxEnv, register
from corral.envs.trl_env import CorralTRLEnv, CorralTRLSplitEnv, corral_safety_reward, corral_task_reward

register()

__all__ = ["CorralTRLEnv", "CorralTRLSplitEnv", "SandboxEnv", "corral_safety_reward", "corral_task_reward", "register"]
